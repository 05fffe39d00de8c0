"""Optimizer steps whose loss or gradient norm is NaN or infinite.

Such a step is not taken: the gradients are dropped before AdamW and the scheduler see them, so the
weights, AdamW's moments and step count and the learning rate are exactly as before the batch (a
NaN in the moments would otherwise poison every later step). Each one gets a row in
metrics.jsonl (`"nonfinite": true`, the loss and gradient norm as computed, the records' ids:
those of the micro-batches whose loss was not finite, or all of the step's when only the gradient
norm was) and a line on stderr; more than `max_nonfinite_steps` in a row stop the run with a
NonFiniteError, before any further checkpoint, so `latest` stays on the last good one.

Every rank sees the same loss (all-reduced) and gradient norm (of the synchronized gradients), so
all take the same decision. Under DeepSpeed the engine steps inside its own `step()` (with fp16
its loss scaler skips overflowing steps; with bf16 / fp32 it applies them): there the step is
reported and counted towards the limit, but not undone.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from eagle_fast.train.checkpoint import read_latest


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def finite(loss: float, grad_norm: Any) -> bool:
    return math.isfinite(loss) and math.isfinite(float(grad_norm))


def culprits(micro: list[dict], micro_losses: list[torch.Tensor], world: int) -> list[Any]:
    """The ids of the records behind a non-finite step, over every rank (a collective: called by
    all ranks, which all know the step was non-finite). The records of the micro-batches whose own
    loss was not finite; all of the step's when every loss was finite (the gradient overflowed)."""
    losses = torch.stack(micro_losses).double().tolist() if micro_losses else []
    local = [(list(b["ids"]), loss) for b, loss in zip(micro, losses)]
    parts = [local]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
    pairs = [p for part in parts for p in part]
    bad = [i for ids, loss in pairs if not math.isfinite(loss) for i in ids]
    return bad or [i for ids, _ in pairs for i in ids]


def _num(x: Any) -> float:
    return float(x)  # NaN / inf kept: json writes NaN / Infinity, and the loss plot leaves a gap


def row(
    step: int,
    loss: float,
    grad_norm: Any,
    ids: list[Any],
    total: int,
    in_a_row: int,
    applied: bool,
    epoch: int,
    position: int,
) -> dict[str, Any]:
    """metrics.jsonl's row for a non-finite step. `step`: the step the batch was for; (epoch,
    position): where the data stream stood after it, which tells a resume whether the row is
    before or past its checkpoint."""
    return {
        "step": step,
        "loss": _num(loss),
        "grad_norm": _num(grad_norm),
        "nonfinite": True,
        "step_skipped": not applied,
        "ids": ids,
        "nonfinite_total": total,
        "nonfinite_in_a_row": in_a_row,
        "epoch": epoch,
        "position": position,
    }


def describe(r: dict[str, Any]) -> str:
    what = [
        f"loss {r['loss']}" if not math.isfinite(r["loss"]) else "",
        f"gradient norm {r['grad_norm']}" if not math.isfinite(r["grad_norm"]) else "",
    ]
    done = "optimizer step skipped" if r["step_skipped"] else "applied by DeepSpeed"
    return (
        f"step {r['step']}: non-finite {' and '.join(w for w in what if w)} ({done}; "
        f"{r['nonfinite_in_a_row']} in a row, {r['nonfinite_total']} in all); records {r['ids']}"
    )


class Tracker:
    """The run's count of non-finite steps (in all, and in a row now), kept in its checkpoints."""

    def __init__(self, limit: int, output_dir: str, rank: int = 0, world: int = 1):
        self.limit, self.output_dir, self.rank, self.world = limit, output_dir, rank, world
        self.total, self.in_a_row = 0, 0

    def state(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = state.get("total", 0), state.get("in_a_row", 0)

    def good(self) -> None:
        self.in_a_row = 0

    def bad(
        self,
        micro: list[dict],
        micro_losses: list[torch.Tensor],
        loss: float,
        grad_norm: Any,
        applied: bool,
        step: int,
        epoch: int,
        position: int,
    ) -> tuple[dict[str, Any], NonFiniteError | None]:
        """Collective (names the records over every rank): the step's metrics row, and past the
        limit the NonFiniteError to raise once the row is logged."""
        self.total += 1
        self.in_a_row += 1
        ids = culprits(micro, micro_losses, self.world)
        r = row(step, loss, grad_norm, ids, self.total, self.in_a_row, applied, epoch, position)
        if self.in_a_row > self.limit:
            latest = read_latest(self.output_dir)
            latest = latest and os.path.join(self.output_dir, latest)
            return r, NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (more than "
                f"--max_nonfinite_steps {self.limit}); the last: {describe(r)}. Stopping: `latest` still names "
                f"{latest or 'no checkpoint'}. Check those records, or lower the learning rate, then resume "
                f"with --resume auto"
            )
        if self.rank == 0:
            print(describe(r), file=sys.stderr, flush=True)
        return r, None
