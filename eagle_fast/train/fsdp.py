"""FSDP2 (torch's fully_shard) for the trainer, without DeepSpeed: every LLM decoder layer and every
vision expert is its own shard unit, then the root. Checkpoints gather full (CPU) state dicts on
rank 0: the HF-format model, and the optimizer state keyed by parameter name, so a run resumes
exactly with the same world size."""

from __future__ import annotations

from typing import Any

import torch

from eagle_fast.train.config import TrainConfig


def shard(model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """Shards `model` in place on the current device's mesh (the model must already be there).
    bf16: parameters are all-gathered and computed in bf16 and gradients reduced in fp32 (a
    MixedPrecisionPolicy: half the all-gather bytes of fp32 weights under autocast), the fp32
    sharded parameters staying the optimizer's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, **kw)
    for expert in base.model.vision_tower.vision_towers:
        fully_shard(expert, **kw)
    fully_shard(model, **kw)
    return model


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every rank calls; rank 0 receives the full state dict (others: empty)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> None:
    """Collective: rank 0's full states are broadcast and sharded onto every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # not strict: parameters that never received a gradient (e.g. ConvNeXt's unused head) have no
    # Adam state yet, in the saved run as in this one
    set_optimizer_state_dict(
        model,
        optimizer,
        optim_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
    )


def enabled(cfg: TrainConfig, world: int) -> bool:
    return bool(cfg.fsdp) and world > 1
