"""The demo's training stages, each reused only when made by the same inputs.

A stage folder holds `demo-stage.json`, the manifest of what produces it: the trainer command,
the recipe's resolved settings for that stage, the step count, the seed, a digest of the data it
trains on, the package version, and the manifest digest of the stage it starts from. A finished
stage whose manifest equals the one a run would write is reused; one with another manifest (or
none) is deleted and trained again, never reused; an unfinished one with the same manifest
resumes from its last checkpoint (`--resume auto`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from eagle_fast import atomic

MANIFEST = "demo-stage.json"


def data_digest(paths: list[str]) -> str:
    """sha256 over the files' contents in order (the data a stage trains on)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class Stage:
    name: str  # what the demo prints: "stage 1", "stage 2", ...
    folder: str
    args: list[str]  # trainer arguments after `python -m eagle_fast.train`
    done_file: str  # relative to folder: exists once the stage has finished
    recipe_stage: str  # "pretrain" / "sft": the recipe entry whose settings the manifest records
    steps: int | None
    seed: int
    data: str  # digest of the training data
    parent: dict | None = None  # manifest of the stage this one starts from
    extra: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        from eagle_fast import __version__
        from eagle_fast.train.config import recipe

        settings = dataclasses.asdict(recipe("demo", self.recipe_stage))
        settings.pop("output_dir")  # where it goes is not what it is
        return {
            "stage": self.name,
            "command": self.args,
            "recipe": settings,
            "steps": self.steps,
            "seed": self.seed,
            "data": self.data,
            "version": __version__,
            "parent": digest(self.parent) if self.parent is not None else None,
            **self.extra,
        }


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _differences(old: dict | None, new: dict) -> str:
    if old is None:
        return "no manifest"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "differs in " + ", ".join(keys)


def run_stage(stage: Stage, python: list[str]) -> bool:
    """Trains `stage` unless its folder already holds it, finished, under the same manifest.
    Returns True when it ran (or resumed), False when reused."""
    want = stage.manifest()
    path = os.path.join(stage.folder, MANIFEST)
    have = _read(path)
    done = os.path.exists(os.path.join(stage.folder, stage.done_file))
    if have == want and done:
        print(f"{stage.name}: reusing {stage.folder} (same recipe, steps, seed, data and version)", flush=True)
        return False
    if os.path.exists(stage.folder) and have != want:
        # checkpoints of another recipe, seed or data must neither be reused nor resumed
        print(
            f"{stage.name}: {stage.folder} was made otherwise ({_differences(have, want)}): training it again",
            flush=True,
        )
        shutil.rmtree(stage.folder)
    os.makedirs(stage.folder, exist_ok=True)
    # written before training: an interrupted run resumes under the same manifest
    atomic.write_json(path, want, indent=1, sort_keys=True)
    cmd = python + stage.args
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not os.path.exists(os.path.join(stage.folder, stage.done_file)):
        raise RuntimeError(f"{stage.name}: the trainer finished without writing {stage.folder}/{stage.done_file}")
    return True
