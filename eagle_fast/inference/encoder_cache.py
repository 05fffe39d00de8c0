"""Encoder cache: projected image features (grid^2, hidden) keyed by the image's content digest,
least recently used first out, bounded in bytes.

In-flight de-duplication: an image asked for while its experts are pending (queued, not yet run)
joins that one pending job instead of queueing another, so 16 requests carrying one image run the
experts once. Features handed to a sequence stay referenced by it, so an eviction never takes
them from a request that is still using them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.pending: OrderedDict[str, tuple] = OrderedDict()  # digest -> (processor output, image index)
        self.hits = self.misses = self.encoded = 0

    def get(self, digest: str) -> torch.Tensor | None:
        feats = self.entries.get(digest)
        if feats is not None:
            self.entries.move_to_end(digest)
        return feats

    def request(self, digest: str, images, index: int) -> torch.Tensor | None:
        """The features if cached (a hit); else queues the experts for this image once (a miss) and
        returns None."""
        feats = self.get(digest)
        if feats is not None:
            self.hits += 1
            return feats
        self.misses += 1
        if digest not in self.pending:
            self.pending[digest] = (images, index)
        return None

    def put(self, digest: str, feats: torch.Tensor) -> None:
        self.pending.pop(digest, None)
        self.encoded += 1
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: used by its requests, not kept
        if digest in self.entries:
            self.bytes -= self.entries.pop(digest).numel() * feats.element_size()
        self.entries[digest] = feats
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def drop_pending(self, digest: str) -> None:
        self.pending.pop(digest, None)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
