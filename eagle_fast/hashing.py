"""File digests (a leaf module): checkpoint manifests, weight-source records and evaluation
fingerprints all identify files by their sha256."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 24  # 16 MiB reads: hashlib releases the GIL on buffers this large


def file_digest(path: str, sync: bool = False) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file; `sync` also forces its data to disk (fsync), for a writer
    that is about to publish it."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return n, h.hexdigest()
