"""group_by_modality_length: batches of image records and batches of text-only records, each
length-sorted within megabatches (LLaVA's sampler), deterministic per (seed, epoch), split across
ranks so that every rank gets the same number of batches.

lengths: per record, > 0 for records with images, < 0 for text-only ones, 0 for unreadable ones
(treated as text-only; their skip is counted when read). Each modality is shuffled, cut into
megabatches of world_size * batch_size, each megabatch sorted by length (longest first) and dealt
to the ranks so the ranks' total lengths stay even; megabatches of both modalities are then
shuffled together; the two partial leftovers form the last megabatch. The index list is padded by
repeating its start so it divides evenly, as DistributedSampler does.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class ModalityLengthSampler(torch.utils.data.Sampler[int]):
    def __init__(self, lengths, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} of world {world_size}, batch {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _megabatches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        mega = self.world_size * self.batch_size
        full, rest = [], []
        for idx in (np.flatnonzero(self.lengths > 0), np.flatnonzero(self.lengths <= 0)):
            idx = rng.permutation(idx)
            cut = len(idx) // mega * mega
            full += [idx[i : i + mega] for i in range(0, cut, mega)]
            rest.append(idx[cut:])
        order = rng.permutation(len(full))
        out = [full[i] for i in order]
        tail = np.concatenate(rest)
        if len(tail):
            out.append(tail)
        return out

    def _deal(self, mb: np.ndarray) -> list[np.ndarray]:
        """Longest first, each record to the rank with the smallest total so far (and room left)."""
        mb = mb[np.argsort(-np.abs(self.lengths[mb]), kind="stable")]
        per = -(-len(mb) // self.world_size)
        ranks = [[] for _ in range(self.world_size)]
        totals = np.zeros(self.world_size)
        for i in mb:
            open_ranks = [r for r in range(self.world_size) if len(ranks[r]) < per]
            r = min(open_ranks, key=lambda r: totals[r])
            ranks[r].append(i)
            totals[r] += abs(self.lengths[i])
        return [np.asarray(r, np.int64) for r in ranks]

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch (batches are consecutive runs of batch_size)."""
        mine: list[int] = []
        for mb in self._megabatches():
            dealt = self._deal(mb)
            n = max(len(d) for d in dealt)
            part = dealt[self.rank]
            if len(part) < n:  # pad so every rank has as many items (repeat from the megabatch)
                part = np.concatenate([part, mb[: n - len(part)]])
            mine += part.tolist()
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches for packing: consecutive indices of `sampler` grouped while their lengths (rows:
    text tokens + image rows, e.g. `abs(dataset.modality_lengths())`) fit `max_tokens`. A record
    longer than the budget forms a batch alone. Use with EagleCollator(pack=True)."""

    def __init__(self, sampler, lengths, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.sampler, self.lengths, self.max_tokens = sampler, np.abs(np.asarray(lengths, np.int64)), max_tokens

    def __iter__(self) -> Iterator[list[int]]:
        batch, total = [], 0
        for i in self.sampler:
            n = max(int(self.lengths[i]), 1)
            if batch and total + n > self.max_tokens:
                yield batch
                batch, total = [], 0
            batch.append(i)
            total += n
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in iter(self))
