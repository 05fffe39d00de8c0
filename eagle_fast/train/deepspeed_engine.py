"""DeepSpeed ZeRO-2 / ZeRO-3 for the trainer: the JSON configs shipped in the package (or a user
file), their "auto" values filled from the training config, engine creation, and gathering
ZeRO-3-partitioned weights for HF-format saves."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from eagle_fast.train.config import TrainConfig

SHIPPED = {"zero2": "zero2.json", "zero3": "zero3.json"}


def load_config(name_or_path: str) -> dict[str, Any]:
    path = name_or_path
    if name_or_path in SHIPPED:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_configs", SHIPPED[name_or_path])
    elif not os.path.exists(path):
        raise FileNotFoundError(f"deepspeed config {name_or_path!r}: not a file, nor one of {sorted(SHIPPED)}")
    with open(path) as f:
        return json.load(f)


def fill_auto(ds: dict[str, Any], cfg: TrainConfig, world: int) -> dict[str, Any]:
    """Replaces "auto" with the training config's values (as the HF Trainer integration does)."""
    values = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
        "gradient_clipping": cfg.max_grad_norm,
    }
    out = json.loads(json.dumps(ds))
    for k, v in values.items():
        if out.get(k, "auto") == "auto":
            out[k] = v
    if isinstance(out.get("bf16"), dict) and out["bf16"].get("enabled") == "auto":
        out["bf16"]["enabled"] = cfg.bf16
    zero = out.get("zero_optimization", {})
    for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(k) == "auto":
            zero[k] = 5e8 if k != "stage3_param_persistence_threshold" else 1e4
    return out


def initialize(model, optimizer, scheduler, cfg: TrainConfig, world: int):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=fill_auto(load_config(cfg.deepspeed), cfg, world),
    )
    return engine


# The engine's files go under checkpoint-N/deepspeed/ (one file per rank for the ZeRO partitions),
# inside the temporary directory, so the checkpoint's manifest lists and verifies them too.
TAG = "deepspeed"


def save(engine, folder: str) -> None:
    """Collective: every rank writes its optimizer partition into folder/deepspeed. No 'latest'
    file of DeepSpeed's own: the trainer's `latest` names checkpoints, and loading names the tag."""
    engine.save_checkpoint(folder, tag=TAG, save_latest=False)


def load(engine, folder: str) -> None:
    """Collective: restores the module, optimizer partitions and scheduler from folder/deepspeed.
    DeepSpeed reports a missing checkpoint by returning None: raised here, naming the folder.
    (DeepSpeed reads its own files with its own torch.load settings; the manifest has checked
    their bytes before this is called.)"""
    path, _ = engine.load_checkpoint(folder, tag=TAG, load_module_strict=True)
    if path is None:
        from eagle_fast.train.checkpoint import CheckpointError

        raise CheckpointError(f"{os.path.join(folder, TAG)}: DeepSpeed found no checkpoint there")


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine is not None else 0


def gathered(model, engine):
    """Full weights visible on every rank for the duration (ZeRO-3 partitions them)."""
    if zero_stage(engine) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
