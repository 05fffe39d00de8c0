"""metrics.jsonl: one JSON row per logged optimizer step (and one per non-finite step), appended
and flushed as the run goes."""

from __future__ import annotations

import json
import os

from eagle_fast import atomic


def _before(row: dict, step: int, epoch: int, position: int) -> bool:
    """Whether `row` describes training up to a checkpoint at (step, epoch, position). A step row
    by its step; a non-finite row by where the data stream stood after its batch (it has no step
    of its own: a checkpoint can follow it at the same step)."""
    if row.get("nonfinite"):
        return (row["epoch"], row["position"]) <= (epoch, position)
    return row["step"] <= step


def open_metrics(path: str, step: int, epoch: int, position: int):
    """metrics.jsonl for appending. After a resume at step S, the rows past S (written after the
    checkpoint by the interrupted run, whose steps are now redone) and a torn last line are dropped
    first, so every step has one row."""
    if os.path.exists(path):
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if _before(json.loads(line), step, epoch, position):
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line of a killed run
        atomic.write_lines(path, kept)
    return open(path, "a", encoding="utf-8")
