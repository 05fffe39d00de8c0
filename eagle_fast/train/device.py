"""Where a training rank runs: the device it owns, set up once before the model is built.

Under torchrun every process reads LOCAL_RANK: with CUDA it owns `cuda:LOCAL_RANK` (as DDP,
FSDP2 and NCCL expect: one device per process, made current with torch.cuda.set_device), else
the CPU. `--device` overrides (e.g. `cpu` on a GPU machine, or `cuda:3` for one process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def resolve_device(
    requested: str | None, env: Mapping[str, str] | None = None, cuda_available: bool | None = None
) -> torch.device:
    """The rank's device: `requested` if given, else cuda:$LOCAL_RANK with CUDA, else cpu."""
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not cuda:
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
        return device
    if cuda:
        return torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup_device(device: torch.device, tf32: bool) -> None:
    """Makes `device` this process's current CUDA device and applies the run's TF32 choice (the
    official recipes turn it on: fp32 matmuls and convolutions on tensor cores). Nothing on CPU."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    # process-wide switches by nature: a training process trains one run
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def backend_for(device: torch.device) -> str:
    """The process-group backend that carries this device's tensors."""
    return "nccl" if device.type == "cuda" else "gloo"
