"""Reading a native checkpoint from a local file or model directory into a flat state dict."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from eagle_fast.vision.weights.base import ExpertWeightsError, few
from eagle_fast.vision.weights.convert import rules_for

# A model directory's weights, first found wins: HF's single or sharded files (safetensors before
# pickles; timm's hub repos use the same names), then open_clip's.
DIR_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Training checkpoints nest the weights: EVA's detectron2 runs keep the EMA weights as `ema_state`
# (Eagle's loader takes it first), DeepSpeed runs as `module` (Eagle's second choice), detectron2's
# Checkpointer the live model as `model`, other trainers as `state_dict`.
NESTED = ("ema_state", "module", "model", "state_dict")


def read_native(name: str, path: str) -> dict[str, torch.Tensor]:
    """The native state dict of expert `name` from `path`: a model directory (see DIR_FILES) or a
    `.safetensors`, `*.index.json` (sharded) or pickled (`.bin`, `.pth`, `.pt`, `.ckpt`; read with
    weights_only=True, never executing pickled code) file. Pickles nesting their weights are unwrapped
    by NESTED, first present wins; non-tensor entries (step counters, ...) are dropped."""
    rules_for(name)  # an unknown expert fails before any file is touched
    p = Path(path)
    if not p.exists():
        raise ExpertWeightsError(f"{name}: no weights at {path}: no such file or directory")
    file = _dir_file(name, p) if p.is_dir() else p
    try:
        state = _read(file)
    except ExpertWeightsError as exc:
        raise ExpertWeightsError(f"{name}: {exc}") from None
    except Exception as exc:  # torch / safetensors / json errors: say which expert and file
        raise ExpertWeightsError(f"{name}: cannot read weights from {file}: {type(exc).__name__}: {exc}") from exc
    if not state:
        raise ExpertWeightsError(f"{name}: no tensors in {file}")
    return state


def _dir_file(name: str, d: Path) -> Path:
    for f in DIR_FILES:
        if (d / f).is_file():
            return d / f
    present = sorted(x.name for x in d.iterdir())
    raise ExpertWeightsError(
        f"{name}: no weights file in directory {d}: looked for {', '.join(DIR_FILES)}; "
        f"it holds: {few(present) or 'nothing'}"
    )


def _read(file: Path) -> dict[str, torch.Tensor]:
    if file.name.endswith(".index.json"):
        return _read_sharded(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    if file.suffix in PICKLE_SUFFIXES:
        return _unwrap(file, _torch_load(file))
    raise ExpertWeightsError(
        f"{file}: unknown weights file type {file.suffix!r} (want .safetensors, "
        f"*.index.json or one of {', '.join(PICKLE_SUFFIXES)})"
    )


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read(index.parent / shard))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise ExpertWeightsError(f"{index}: {len(absent)} key(s) listed in the index are in no shard: {few(absent)}")
    return state


def _torch_load(file: Path):
    try:  # memory-mapped: large checkpoints are not read whole, only the tensors used are paged in
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    return torch.load(file, map_location="cpu", weights_only=True)  # pre-zip (legacy) format


def _unwrap(file: Path, obj) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ExpertWeightsError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    for key in NESTED:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
