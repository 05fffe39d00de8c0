"""Batching: padding collator, packing, and the group-by-modality-length sampler.

EagleCollator pads token ids (right by default) and labels (-100), builds the attention mask,
concatenates the images of the batch's records in order (text-only records add none), and moves
skipped-record markers out of the batch into batch["skipped"]. With `pack=True` the records are
concatenated into one row with `packed_seq_lens`; the model restarts positions per record and
runs attention over each record alone (varlen); each record's first token is kept out of the
targets, as a padded row's shift keeps it, so the loss equals the padded batch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from eagle_fast.constants import IGNORE_INDEX


def concat_images(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Processor outputs of several records -> one output holding all their images, in order."""
    if not parts:
        return None
    out: dict[str, Any] = {"pixel_values": torch.cat([p["pixel_values"] for p in parts])}
    experts: dict[str, Any] = {}
    for name, first in parts[0].get("expert_inputs", {}).items():
        if isinstance(first, dict):
            experts[name] = {k: torch.cat([p["expert_inputs"][name][k] for p in parts]) for k in first}
        else:
            experts[name] = torch.cat([p["expert_inputs"][name] for p in parts])
    out["expert_inputs"] = experts
    if all("image_digests" in p for p in parts):
        out["image_digests"] = [d for p in parts for d in p["image_digests"]]
    return out


def select_images(images: dict[str, Any] | None, indices: list[int]) -> dict[str, Any] | None:
    """The processor output holding only images `indices` (in that order); None when empty."""
    if images is None or not indices:
        return None
    idx = torch.tensor(indices, dtype=torch.long)

    def pick(v):
        return {k: t[idx] for k, t in v.items()} if isinstance(v, dict) else v[idx]

    out: dict[str, Any] = {"pixel_values": images["pixel_values"][idx]}
    out["expert_inputs"] = {name: pick(v) for name, v in images.get("expert_inputs", {}).items()}
    if "image_digests" in images:
        out["image_digests"] = [images["image_digests"][i] for i in indices]
    return out


def to_device(obj: Any, device: torch.device | str) -> Any:
    """A batch or processor output with every tensor (nested in dicts too) on `device`: copies
    only what is elsewhere, asynchronously from pinned memory; other values as they are."""
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj.to(device, non_blocking=True) if isinstance(obj, torch.Tensor) else obj


@dataclass
class EagleCollator:
    pad_token_id: int = 0
    padding_side: str = "right"
    pack: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = [{k: it[k] for k in ("skipped", "id", "where")} for it in items if "skipped" in it]
        items = [it for it in items if "skipped" not in it]
        batch: dict[str, Any] = {"skipped": skipped, "ids": [it.get("id") for it in items]}
        if not items:
            batch.update(input_ids=None, labels=None, attention_mask=None, images=None)
            return batch
        batch["images"] = concat_images([it["images"] for it in items if it["images"] is not None])
        if self.pack:
            lens = torch.tensor([len(it["input_ids"]) for it in items])
            batch["input_ids"] = torch.cat([it["input_ids"] for it in items])[None]
            labels = torch.cat([it["labels"] for it in items])  # a new tensor: the records keep theirs
            # a record's first token is never a target in a padded row (the shift drops it); in the
            # packed row it would be one, predicted from the previous record's last token
            starts = lens.cumsum(0)[:-1]
            labels[starts[starts < len(labels)]] = IGNORE_INDEX
            batch["labels"] = labels[None]
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            batch["packed_seq_lens"] = lens
            return batch
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            sl = slice(n - k, n) if self.padding_side == "left" else slice(0, k)
            ids[i, sl], labels[i, sl], mask[i, sl] = it["input_ids"], it["labels"], 1
        batch.update(input_ids=ids, labels=labels, attention_mask=mask)
        return batch
