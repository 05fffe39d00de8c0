"""Training checkpoints: written atomically, newest found by `latest`, old ones pruned.

A checkpoint is a directory `checkpoint-{step}` holding the model in HF format (safetensors +
config.json with the official mm_* fields) and `trainer_state.pt` (optimizer, scheduler, step,
data position, RNG states). It is written under `checkpoint-{step}.tmp` and renamed when complete;
then `latest` (a one-line file) is replaced to name it, and only then are checkpoints beyond
`keep` deleted. A process killed at any point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch

LATEST = "latest"
FULL_STATE = "full_state.safetensors"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin(output_dir: str, step: int) -> str:
    """A fresh temporary directory for checkpoint-{step} (call on one rank, then synchronize)."""
    tmp = os.path.join(output_dir, f"checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_model(model: torch.nn.Module, path: str, savers: tuple[Any, ...] = (),
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The model in HF format (LoRA: adapter + non-LoRA trainables + the full state for resuming);
    `state_dict` overrides the module's own (a full state gathered from shards)."""
    if hasattr(model, "peft_config"):
        from safetensors.torch import save_model

        from eagle_fast.train.lora import is_quantized, save_lora, trainer_state_dict

        save_lora(model, path)
        if is_quantized(model):  # QLoRA: no quantized weights (rebuilt from the base on resume)
            from safetensors.torch import save_file

            save_file(trainer_state_dict(model), os.path.join(path, FULL_STATE))
        else:
            save_model(model, os.path.join(path, FULL_STATE))
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    for obj in savers:  # tokenizer, image processor: anything with save_pretrained(dir)
        obj.save_pretrained(path)


def commit(output_dir: str, step: int, keep: int) -> str:
    """Renames the complete temporary directory into place, then points `latest` at it, then prunes."""
    name = f"checkpoint-{step}"
    final = os.path.join(output_dir, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(final + ".tmp", final)
    _atomic_write_text(os.path.join(output_dir, LATEST), name + "\n")
    _prune(output_dir, keep, newest=name)
    return final


def save_checkpoint(output_dir: str, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int,
                    savers: tuple[Any, ...] = ()) -> str:
    """Single-process form: writes checkpoint-{step} atomically and points `latest` at it."""
    tmp = begin(output_dir, step)
    write_model(model, tmp, savers)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    return commit(output_dir, step, keep)


def _prune(output_dir: str, keep: int, newest: str) -> None:
    for d in os.listdir(output_dir):  # leftovers of saves that were killed half-way
        if d.startswith("checkpoint-") and d.endswith(".tmp"):
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
    steps = sorted((int(d.split("-")[1]), d) for d in os.listdir(output_dir)
                   if d.startswith("checkpoint-") and not d.endswith(".tmp") and d.split("-")[1].isdigit())
    for _, d in steps[: max(len(steps) - max(keep, 1), 0)]:
        if d != newest:
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)


def find_resume(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint to resume from: `latest`'s for "auto" (None when there is none), or `resume`."""
    if resume is None:
        return None
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, "trainer_state.pt")):
            raise FileNotFoundError(f"{resume}: not a complete checkpoint (no trainer_state.pt)")
        return resume
    latest = os.path.join(output_dir, LATEST)
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        path = os.path.join(output_dir, f.read().strip())
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"{latest} names {path}, which is incomplete")
    return path


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Loads the checkpoint's safetensors shards into `model` in place (exact values)."""
    from safetensors.torch import load_file, load_model

    if os.path.exists(os.path.join(path, FULL_STATE)):
        from eagle_fast.train.lora import is_quantized, trainer_state_dict

        if not is_quantized(model):
            load_model(model, os.path.join(path, FULL_STATE), strict=True)
            return
        state, want = load_file(os.path.join(path, FULL_STATE)), set(trainer_state_dict(model))
        if set(state) != want:
            raise RuntimeError(f"{path}: QLoRA checkpoint does not match the model (missing "
                               f"{sorted(want - set(state))[:5]}, unexpected {sorted(set(state) - want)[:5]})")
        model.load_state_dict(state, strict=False)
        return
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
