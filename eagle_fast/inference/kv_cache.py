"""The engine's paged KV memory: a pool of fixed-size blocks with reference counts and a prefix
cache keyed by block-granular hashes of the rows a block holds.

The K/V tensors are (layers, num_blocks, block_size, Hkv, D) each, sized from a byte budget. A
sequence owns a list of blocks (its block table); a full block is registered under the chained
hash of every row up to its end (a text row is its token id, an image row is (image digest, row
index)), so the K/V it holds depends only on what the hash covers (attention is causal). Another
sequence whose rows hash the same reuses the block (its reference count goes up) instead of
computing it: a shared system prompt + image, or a chat's earlier turns. A block whose count
falls to 0 keeps its K/V and hash and is evicted least recently used when a block is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import torch


def block_hashes(row_keys: list, block_size: int, start_hash: bytes = b"", start: int = 0) -> list[bytes]:
    """Chained hashes of the full blocks of `row_keys` from row `start` (a block boundary) on,
    `start_hash` being the hash of the block ending at `start` (b"" at 0)."""
    out, prev = [], start_hash
    for a in range(start, len(row_keys) - block_size + 1, block_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(repr(row_keys[a : a + block_size]).encode())
        prev = h.digest()
        out.append(prev)
    return out


class BlockPool:
    """Block allocation with reference counts and the prefix cache (not thread-safe: the engine's
    step loop is its only user)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ):
        if num_blocks < 1:
            raise ValueError(f"the KV budget holds no block of {block_size} rows; raise it")
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # unused, no cached content
        self.evictable: OrderedDict[int, None] = OrderedDict()  # count 0, content cached, LRU first
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.queried_blocks = 0  # prefix-cache lookups and hits, in blocks
        self.hit_blocks = 0

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        """A block with count 1 (an unused one first, else the least recently used cached one)."""
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        else:
            raise RuntimeError("KV cache: no free block (the scheduler should have checked)")
        self.refs[b] = 1
        return b

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each with its count raised."""
        found = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            found.append(b)
        self.queried_blocks += len(hashes)
        self.hit_blocks += len(found)
        for b in found:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
        return found

    def register(self, block: int, h: bytes) -> None:
        """Marks a full block as holding the rows hashed `h` (the first holder of a hash keeps it)."""
        if block not in self.hash_of and h not in self.by_hash:
            self.hash_of[block], self.by_hash[h] = h, block

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # the tail of a sequence is evicted before its shared head
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
        blocks.clear()

    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0
