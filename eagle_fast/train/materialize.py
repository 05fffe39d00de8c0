"""Building the model once per job, not once per rank.

A 7B Eagle in fp32 is ~28 GB; eight ranks of a node each building and loading it would need eight
host copies. Instead, how a rank constructs the model depends on the run:

  "real"   the model is built and its weights loaded on the host (one process; rank 0 of a
           multi-rank run; every rank under QLoRA, whose quantization needs the weights locally)
  "meta"   ranks > 0 of DDP, FSDP2 and DeepSpeed ZeRO-1/2 runs build the model on the meta device
           (shapes only, no memory, no file read), allocate it on their own device — only their
           shards under FSDP2 — and receive every parameter and buffer from rank 0
  "zero3"  DeepSpeed ZeRO-3: every rank builds inside `deepspeed.zero.Init` (transformers' own
           integration: each layer partitioned as soon as it is created, weights from a checkpoint
           loaded into the partitions with rank 0 as the only writer). New weights are drawn module
           by module on rank 0, so a ZeRO-3 run starting from random weights starts from other
           values than a one-process run with the same seed; from a checkpoint, from the same

So the job holds at most one full host copy (rank 0's), plus, for DDP and ZeRO-1/2, the replica
every rank trains on its device by design.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from eagle_fast.train.config import TrainConfig


def zero_stage_of(cfg: TrainConfig) -> int:
    if not cfg.deepspeed:
        return 0
    from eagle_fast.train import deepspeed_engine as ds

    return int(ds.load_config(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0))


def construction(cfg: TrainConfig, rank: int, world: int) -> str:
    """ "real" | "meta" | "zero3": how this rank builds the model (see the module docstring)."""
    if world > 1 and cfg.deepspeed and zero_stage_of(cfg) == 3:
        return "zero3"
    if world == 1 or rank == 0 or cfg.bits != 16:
        return "real"
    return "meta"


def shared_from_rank0(cfg: TrainConfig, world: int) -> bool:
    """Whether ranks > 0 build on meta and take rank 0's weights (a collective every rank joins)."""
    return construction(cfg, 1, world) == "meta"


def zero3_hold(cfg: TrainConfig, world: int):
    """Under "zero3": the object that, while referenced, makes transformers build models inside
    `deepspeed.zero.Init` (partitioned as created; new weights initialised module by module on
    rank 0) and load checkpoints into the partitions (only rank 0 writes). Keep it for the run."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from eagle_fast.train import deepspeed_engine as ds

    deepspeed.init_distributed()  # deepspeed.comm over the process group already up (its world size)
    return HfDeepSpeedConfig(ds.fill_auto(ds.load_config(cfg.deepspeed), cfg, world))


def allocate(model: torch.nn.Module, device: torch.device) -> None:
    """A meta-built model given (uninitialised) storage on `device`; tied weights tied again
    (to_empty replaces each module's parameter separately, which unties them)."""
    model.to_empty(device=device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "tie_weights"):
        base.tie_weights()


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        key = id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def broadcast_from_rank0(model: torch.nn.Module, buffers_only: bool = False) -> int:
    """Collective: every parameter (unless buffers_only) and every buffer — persistent or not:
    RoPE tables, position ids — takes rank 0's values. Returns the number of tensors sent."""
    tensors = [] if buffers_only else [p.data for p in model.parameters()]
    tensors += list(model.buffers())
    tensors = _unique(tensors)
    for t in tensors:
        dist.broadcast(t, src=0)
    return len(tensors)


def fsdp_load_from_rank0(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Collective, after fully_shard: rank 0's full host state dict scattered into every rank's
    shards (the others pass {}), then the buffers, which FSDP2 does not shard, broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    broadcast_from_rank0(model, buffers_only=True)


def describe(kind: str, rank: int) -> str:
    return {
        "real": f"rank {rank}: model built on the host",
        "meta": f"rank {rank}: model built on the meta device, weights from rank 0",
        "zero3": f"rank {rank}: model built partitioned (deepspeed.zero.Init)",
    }[kind]
