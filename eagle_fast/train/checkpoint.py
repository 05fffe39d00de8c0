"""Training checkpoints: written atomically, verified on resume, newest found by `latest`, old ones
pruned.

A checkpoint is a directory `checkpoint-{step}` holding the model in HF format (safetensors +
config.json with the official mm_* fields), `trainer_state.pt` (optimizer, scheduler, step, data
position), every rank's RNG states and `manifest.json` (each file's size and sha256,
eagle_fast.train.manifest). It is written under `checkpoint-{step}.tmp`, the manifest last, and
renamed when complete; then `latest` (a one-line file) is replaced to name it, and only then are
checkpoints beyond `keep` deleted. A process killed at any point leaves `latest` naming a complete
checkpoint; a save that fails (a full disk) removes its folder and leaves `latest` as it was.
`find_resume` takes the newest checkpoint whose files match its manifest, naming each one it
skips. Every pickle here is read with `weights_only=True`: tensors and plain containers only.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from eagle_fast import atomic
from eagle_fast.train import manifest

LATEST = "latest"
FULL_STATE = "full_state.safetensors"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, missing, or holding more than plain data."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); `latest` is unchanged."""


def rng_state() -> dict[str, Any]:
    # numpy's state as plain values (its legacy tuple holds an ndarray, which a weights_only load refuses)
    np_state = np.random.get_state(legacy=False)
    numpy_plain = {
        "bit_generator": np_state["bit_generator"],
        "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "pos": int(np_state["state"]["pos"]),
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
    state = {"python": random.getstate(), "numpy": numpy_plain, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def begin(output_dir: str, step: int) -> str:
    """A fresh temporary directory for checkpoint-{step} (call on one rank, then synchronize)."""
    tmp = os.path.join(output_dir, f"checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_model(
    model: torch.nn.Module, path: str, savers: tuple[Any, ...] = (), state_dict: dict[str, torch.Tensor] | None = None
) -> None:
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


def read_latest(output_dir: str) -> str | None:
    """The checkpoint name `latest` holds (None when there is no `latest`)."""
    try:
        with open(os.path.join(output_dir, LATEST)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _step_of(name: str) -> int | None:
    head, _, tail = name.partition("-")
    return int(tail) if head == "checkpoint" and tail.isdigit() else None


def _committed(output_dir: str) -> list[tuple[int, str]]:
    """(step, name) of every renamed-into-place checkpoint, newest first."""
    found = [(_step_of(d), d) for d in os.listdir(output_dir) if os.path.isdir(os.path.join(output_dir, d))]
    return sorted(((s, d) for s, d in found if s is not None), reverse=True)


def commit(output_dir: str, step: int, keep: int) -> str:
    """Writes the manifest of the complete temporary directory, renames it into place, points
    `latest` at it, then prunes. If `latest` cannot be written, the renamed checkpoint is taken
    back out (unless `latest` already names it) and the error raised: `latest` stays as it was."""
    name = f"checkpoint-{step}"
    final = os.path.join(output_dir, name)
    manifest.write(final + ".tmp", step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(final + ".tmp", final)
    try:
        atomic.write_text(os.path.join(output_dir, LATEST), name + "\n")
    except OSError:
        if read_latest(output_dir) != name:
            shutil.rmtree(final, ignore_errors=True)
        raise
    _prune(output_dir, keep, newest=name)
    return final


def abort(output_dir: str, step: int) -> None:
    """Removes what a failed save of checkpoint-{step} left (its temporary directory)."""
    shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}.tmp"), ignore_errors=True)


def save_failure(output_dir: str, step: int, error: BaseException | str, needed: int | None) -> str:
    """The message of a failed save: the path, the error, the bytes a checkpoint needs and those free."""

    def gb(n: int) -> str:
        return f"{n / 1e9:.2f} GB"

    try:
        free = f"{gb(shutil.disk_usage(output_dir).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"; a checkpoint of this run needs about {gb(needed)} ({needed} bytes), {free}" if needed else ""
    latest = read_latest(output_dir)
    return (
        f"saving {os.path.join(output_dir, f'checkpoint-{step}')} failed: {error}{need}. The partial folder "
        f"was removed and `latest` still names {latest or 'no checkpoint'}; free some space (or point "
        f"--output_dir elsewhere) and resume with --resume auto"
    )


def estimate_bytes(model: torch.nn.Module, optimizer_copies: int = 2) -> int:
    """What a checkpoint of `model` takes: every weight (as stored) plus, per trainable weight,
    `optimizer_copies` same-sized optimizer tensors (AdamW's two moments; DeepSpeed adds its fp32
    master copy). ZeRO-3 partitioned parameters count at their full size (ds_numel)."""
    total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel()) * p.element_size()
        total += n * (1 + (optimizer_copies if p.requires_grad else 0))
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def save_checkpoint(
    output_dir: str, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int, savers: tuple[Any, ...] = ()
) -> str:
    """Single-process form: writes checkpoint-{step} atomically and points `latest` at it. A write
    that fails (OSError: a full disk) removes the partial folder and raises SaveError."""
    tmp = begin(output_dir, step)
    try:
        write_model(model, tmp, savers)
        torch.save(state, os.path.join(tmp, TRAINER_STATE))
        return commit(output_dir, step, keep)
    except OSError as e:
        abort(output_dir, step)
        raise SaveError(save_failure(output_dir, step, e, estimate_bytes(model))) from e


def _prune(output_dir: str, keep: int, newest: str) -> None:
    """Keeps `newest` and the `keep - 1` checkpoints before it. Checkpoints numbered past `newest`
    belong to a history the run was rolled back from (it resumed from an older one): they go too,
    or a later `--resume auto` could mix the two."""
    for d in os.listdir(output_dir):  # leftovers of saves that were killed half-way
        if d.startswith("checkpoint-") and d.endswith(".tmp"):
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
    newest_step = _step_of(newest)
    older = 0
    for s, d in _committed(output_dir):
        if d == newest:
            continue
        if s > newest_step or older >= max(keep, 1) - 1:
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
        else:
            older += 1


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_resume(output_dir: str, resume: str | None, log: Callable[[str], None] = _say) -> str | None:
    """The checkpoint to resume from. `resume` = "auto": the one `latest` names if it verifies,
    else the newest earlier one that does (each one skipped is logged with its bad files); None
    when there is no checkpoint at all; CheckpointError naming every bad file when none verifies.
    A path: that checkpoint, or CheckpointError naming its bad files."""
    if resume is None:
        return None
    if resume != "auto":
        problems = manifest.verify(resume, required=(TRAINER_STATE,))
        if problems:
            raise CheckpointError(f"--resume {resume}: the checkpoint fails verification:\n  " + "\n  ".join(problems))
        return resume
    if not os.path.isdir(output_dir):
        return None
    named, committed = read_latest(output_dir), _committed(output_dir)
    limit = _step_of(named) if named else None
    # `latest` first; without it (killed before its first write) every checkpoint, newest first
    candidates = ([named] if named else []) + [d for s, d in committed if d != named and (limit is None or s < limit)]
    bad: list[str] = []
    for name in candidates:
        path = os.path.join(output_dir, name)
        problems = manifest.verify(path, required=(TRAINER_STATE,))
        if not problems:
            if bad:
                log(f"resuming from {path}, the newest checkpoint that verifies")
            return path
        log(f"skipping checkpoint {path}: " + "; ".join(problems))
        bad.extend(problems)
    if not bad:
        return None
    raise CheckpointError(f"--resume auto: no checkpoint in {output_dir} verifies; bad files:\n  " + "\n  ".join(bad))


def safe_load(path: str) -> Any:
    """torch.load restricted to tensors and plain containers (weights_only=True), on the CPU. A
    file that needs more (arbitrary classes or functions: the way a crafted pickle runs code) is
    refused with a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: advice first, then the line naming the global it would not import
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        reason = next((x for x in lines if "unsupported" in x.lower()), lines[-1] if lines else "")
        reason = reason.split(" Please use")[0].split(" If you")[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain "
            f"containers, and unpickling them could run arbitrary code ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


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
            raise RuntimeError(
                f"{path}: QLoRA checkpoint does not match the model (missing "
                f"{sorted(want - set(state))[:5]}, unexpected {sorted(set(state) - want)[:5]})"
            )
        model.load_state_dict(state, strict=False)
        return
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


# ---------------------------------------------------------------- collectives (every rank calls)


def choose_resume(output_dir: str, resume: str | None, rank: int, world: int, device: torch.device) -> str | None:
    """find_resume run on rank 0 (verifying hashes every file: once, not once per rank) and its
    answer, or its error, sent to every rank: all load the same checkpoint, or all raise."""
    found, error = None, None
    if rank == 0:
        try:
            found = find_resume(output_dir, resume)
        except CheckpointError as e:
            error = str(e)
    if world > 1:
        box = [(found, error)]
        torch.distributed.broadcast_object_list(box, src=0, device=device)
        found, error = box[0]
    if error:
        raise CheckpointError(error)
    return found


def _agree_saved(
    errors: list[OSError],
    output_dir: str,
    step: int,
    rank: int,
    world: int,
    device: torch.device,
    needed: Callable[[], int],
) -> None:
    """SaveError on every rank when a write failed on any (rank 0 first removes the temporary
    directory; the message names each rank's error and the bytes `needed`); else a barrier."""
    from eagle_fast.train.signals import agree

    if not agree(bool(errors), device, world):
        return
    texts = [str(errors[0]) if errors else None]
    if world > 1:
        texts = [None] * world
        torch.distributed.all_gather_object(texts, str(errors[0]) if errors else None)
    error = "; ".join(t if world == 1 else f"rank {r}: {t}" for r, t in enumerate(texts) if t)
    if rank == 0:
        abort(output_dir, step)
    if world > 1:
        torch.distributed.barrier()
    raise SaveError(save_failure(output_dir, step, error, needed()))


def save_collective(
    output_dir: str,
    step: int,
    keep: int,
    rank: int,
    world: int,
    device: torch.device,
    write: Callable[[str, Callable], None],
    needed: Callable[[], int],
) -> str:
    """checkpoint-{step} written by every rank: rank 0 creates the temporary directory; each rank's
    `write(tmp, attempt)` writes its part, every file through `attempt(fn)`; rank 0 commits (the
    manifest, the rename, `latest`). `attempt` keeps a write's OSError instead of raising it, so
    that every rank still reaches the collectives of `write` (DeepSpeed's save, ZeRO-3 gathers);
    after each phase the ranks agree, and on any failure all raise SaveError with the temporary
    directory removed and `latest` as it was."""
    errors: list[OSError] = []

    def attempt(fn: Callable[[], Any]) -> None:
        if not errors:  # after a failure this rank writes nothing more
            try:
                fn()
            except OSError as e:
                errors.append(e)

    tmp = os.path.join(output_dir, f"checkpoint-{step}.tmp")
    if rank == 0:
        attempt(lambda: begin(output_dir, step))
    _agree_saved(errors, output_dir, step, rank, world, device, needed)  # the directory exists for all
    write(tmp, attempt)
    _agree_saved(errors, output_dir, step, rank, world, device, needed)  # every rank's files complete
    if rank == 0:
        attempt(lambda: commit(output_dir, step, keep))
    _agree_saved(errors, output_dir, step, rank, world, device, needed)
    return os.path.join(output_dir, f"checkpoint-{step}")
