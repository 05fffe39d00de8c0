"""Checkpoint manifests: what a complete checkpoint holds, so that a resume can tell it from a
damaged one.

`manifest.json` lists every file of the checkpoint directory (sub-folders included: DeepSpeed's
shards) with its size and sha256. It is written last into the temporary directory, after every
file has been flushed to disk, and before the rename that makes the checkpoint visible; `verify`
re-reads the files and names each one that is missing, of another size (truncated) or of other
content (bit rot, a partial overwrite). Hashing runs on a few threads (hashlib releases the GIL on
large buffers), so a multi-GB checkpoint costs about a disk read.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from eagle_fast.hashing import file_digest

MANIFEST = "manifest.json"
FORMAT = 1


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _hash_all(folder: str, names: list[str], sync: bool) -> list[tuple[int, str]]:
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda n: file_digest(os.path.join(folder, n), sync), names))


def write(folder: str, step: int) -> dict:
    """Hashes every file of `folder` and writes `folder/manifest.json` (flushed to disk)."""
    names = _files(folder)
    files = {n: {"bytes": b, "sha256": s} for n, (b, s) in zip(names, _hash_all(folder, names, sync=True))}
    manifest = {"format": FORMAT, "step": step, "files": files}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify(folder: str, required: tuple[str, ...] = ()) -> list[str]:
    """Every problem found, each naming its file (empty: the checkpoint is intact). `required`:
    files a usable checkpoint must hold, whatever its manifest says."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return [f"{folder}: no such checkpoint directory"]
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        return [f"{path}: missing (a checkpoint is renamed into place only after its manifest is written)"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable ({e})"]
    problems = [f"{os.path.join(folder, r)}: required but not in the manifest" for r in required if r not in files]
    present = []
    for name, want in sorted(files.items()):
        full = os.path.join(folder, name)
        try:
            size = os.path.getsize(full)
        except OSError:
            problems.append(f"{full}: missing (listed in {MANIFEST})")
            continue
        if size != want["bytes"]:  # cheap, and the common damage (a copy or a write cut short)
            problems.append(f"{full}: {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)")
        else:
            present.append(name)
    if problems:  # already unusable: spare the hashing of the rest
        return problems
    for name, (_, digest) in zip(present, _hash_all(folder, present, sync=False)):
        if digest != files[name]["sha256"]:
            problems.append(f"{os.path.join(folder, name)}: sha256 differs from the manifest (corrupted)")
    return problems
