"""The engine's configuration, its per-request state (Sequence) and the iteration-level schedule.

Each step plans one forward: first every running sequence's next row (decode: one row each, the
oldest first), then the rest of running prefills in chunks, then new sequences from the head of
the waiting queue, all within `max_batched_tokens` rows and `max_num_seqs` sequences.

Policy when the KV budget is full:
  * admission: a waiting sequence is admitted only when the blocks for all its rows (after the
    prefix-cache hits) are free; otherwise it and everything behind it wait (strict FIFO: a later,
    smaller request never overtakes it, so nothing starves);
  * decode growth: a running sequence that needs a new block when none is free preempts the most
    recently admitted running sequence (possibly itself): its blocks are released and it goes back
    to the front of the queue to be recomputed (its blocks usually survive in the prefix cache, so
    the recompute is mostly hits), keeping the tokens already sent and its sampling state.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eagle_fast.inference.kv_cache import BlockPool, block_hashes


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    """How the continuous-batching engine schedules and how much memory it holds."""

    max_num_seqs: int = _opt(16, "sequences generating at once (decode batch)")
    max_batched_tokens: int = _opt(512, "rows per step: decode rows plus prefill chunks")
    block_size: int = _opt(16, "KV cache rows per block (prefix-cache granularity)")
    kv_cache_bytes: int | None = _opt(
        None,
        "KV cache budget in bytes (default: 1 GiB, at least one full context; "
        "never more than max_num_seqs full contexts)",
    )
    encoder_cache_bytes: int = _opt(256 << 20, "encoder (image feature) cache budget in bytes")
    max_queue: int = _opt(256, "requests waiting beyond the running ones (more are refused)")

    def validate(self) -> "EngineConfig":
        for name in ("max_num_seqs", "max_batched_tokens", "block_size", "kv_cache_bytes", "max_queue"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_cache_bytes < 0:
            raise ValueError(f"encoder_cache_bytes must be >= 0, got {self.encoder_cache_bytes}")
        return self


class QueueFull(RuntimeError):
    """The engine's waiting queue is full (the server answers 429)."""


@dataclass(eq=False)
class Sequence:
    rid: int
    input_ids: list[int]
    images: Any  # processor output (or None)
    digests: list[str]
    row_keys: list  # one per cache row: the prompt's, then each generated token
    prompt_rows: int
    gen: Any  # GenerationConfig
    sink: Callable[[tuple], None]  # receives ("token", id), ("done", reason), ("error", exc)
    rng: torch.Generator
    procs: Any
    stopper: Any
    stop_ids: set
    seen: list[int]  # text ids the repetition penalty sees
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    embeds: torch.Tensor | None = None  # prompt rows' input embeddings, once the features are there
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # rows whose K/V are in the cache
    hashed: int = 0  # leading full blocks registered in the prefix cache
    last_hash: bytes = b""
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float | None = None  # when the last token was sent

    def pending(self) -> int:
        return len(self.row_keys) - self.computed

    def ready(self) -> bool:
        return len(self.features) == len(self.digests)


class Scheduler:
    """Waiting / running queues and the plan of each step (single-threaded: the step loop's)."""

    def __init__(self, config: EngineConfig, pool: BlockPool, prepare: Callable[[Sequence], None]):
        self.config, self.pool, self.prepare = config, pool, prepare
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.pool.release(victim.blocks)
        victim.computed, victim.hashed, victim.last_hash = 0, 0, b""
        self.waiting.appendleft(victim)
        self.preemptions += 1

    def _admit(self, seq: Sequence) -> bool:
        """Takes the prefix-cache hits and allocates the rest of the sequence's rows, or (when the
        free blocks do not suffice) nothing."""
        bs = self.pool.block_size
        hashes = block_hashes(seq.row_keys[: len(seq.row_keys) - 1], bs)  # the last row is always run
        hits = self.pool.lookup(hashes)
        need = math.ceil(len(seq.row_keys) / bs) - len(hits)
        if need > self.pool.available():
            self.pool.release(hits)
            return False
        seq.blocks = hits + [self.pool.allocate() for _ in range(need)]
        seq.computed = seq.hashed = len(hits)
        seq.computed *= bs
        seq.last_hash = hashes[len(hits) - 1] if hits else b""
        return True

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, rows) in the order their rows are packed."""
        cfg, bs = self.config, self.pool.block_size
        budget, plan = cfg.max_batched_tokens, []
        planned: set[int] = set()
        for seq in list(self.running):  # decode rows first, oldest first
            if seq not in self.running or seq.pending() != 1 or budget < 1:
                continue
            if seq.computed // bs == len(seq.blocks):  # its next row starts a new block
                while not self.pool.available():
                    victim = next(s for s in reversed(self.running) if s.rid not in planned)
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq not in self.running:
                    continue
                seq.blocks.append(self.pool.allocate())
            plan.append((seq, 1))
            planned.add(seq.rid)
            budget -= 1
        for seq in self.running:  # prefills already under way
            if budget > 0 and seq.pending() > 1:
                n = min(seq.pending(), budget)
                plan.append((seq, n))
                planned.add(seq.rid)
                budget -= n
        while budget > 0 and self.waiting and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if not seq.ready():
                break  # its experts run first (the encoder unit serves the oldest request)
            self.prepare(seq)
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.pending(), budget)
            plan.append((seq, n))
            planned.add(seq.rid)
            budget -= n
        return plan

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)

    def register_blocks(self, seq: Sequence) -> None:
        """Enters the sequence's newly completed full blocks into the prefix cache."""
        bs = self.pool.block_size
        while (seq.hashed + 1) * bs <= seq.computed:
            h = block_hashes(seq.row_keys[seq.hashed * bs : (seq.hashed + 1) * bs], bs, seq.last_hash)[0]
            self.pool.register(seq.blocks[seq.hashed], h)
            seq.hashed, seq.last_hash = seq.hashed + 1, h
