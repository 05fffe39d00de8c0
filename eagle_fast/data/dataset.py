"""EagleDataset: LLaVA-format records -> token ids, labels and preprocessed images; bad records
skipped, counted by reason and logged with file, line and id — never silently dropped, never
patched with a substitute image.

    ds = EagleDataset("sft.jsonl", "images/", tokenizer, EagleImageProcessor(...), "vicuna_v1", 2048)
    loader = DataLoader(ds, batch_size=4, collate_fn=EagleCollator(tokenizer.pad_token_id), num_workers=4)
    ...
    ds.report()            # {reason: count} seen in this process; batches also carry "skipped"

Items are dicts {"input_ids", "labels" (LongTensor), "images" (processor output for this
record's images, or None), "id", "where"}; a skipped record yields {"skipped": reason, "id",
"where", "message"} that the collator removes from the batch and reports in batch["skipped"], so
the counts reach the training loop from DataLoader workers too. Once `min_seen` records have been
read, a share of bad records above `max_bad_fraction` raises an error naming the worst reasons.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import torch

from eagle_fast.data.records import BadRecord, open_source
from eagle_fast.data.tokenize import DataError, tokenize_conversation
from eagle_fast.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageFileError, load_image_file

log = logging.getLogger("eagle_fast.data")

REASONS = (
    "missing_image",
    "corrupt_image",
    "bad_json",
    "bad_roles",
    "image_count_mismatch",
    "no_supervised_tokens",
    "path_escape",
    "too_long",
)


class EagleDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        data_path,
        image_folder: str | os.PathLike,
        tokenizer: Any,
        processor: Any,
        template: str = "vicuna_v1",
        model_max_length: int = 2048,
        *,
        image_tokens: int | None = None,
        weights: list[float] | None = None,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
        min_seen: int = 200,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.source = open_source(data_path, weights, seed)
        self.image_folder = os.fspath(image_folder)
        self.tokenizer, self.processor, self.template = tokenizer, processor, template
        self.model_max_length = model_max_length
        # rows each image takes in the LLM: grid * grid (1024 for every official model)
        self.image_tokens = image_tokens if image_tokens is not None else 1024
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.skipped: Counter = Counter()
        self.seen = 0
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)

    def report(self) -> dict[str, int]:
        """{reason: count} of records skipped so far in this process (every reason listed)."""
        return {r: self.skipped.get(r, 0) for r in REASONS}

    def _images(self, record: dict[str, Any]) -> list[str]:
        img = record.get("image")
        if img is None:
            return []
        return [img] if isinstance(img, str) else list(img) if isinstance(img, list) else [img]

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.seen += 1
        rid, where = None, f"record {i}"
        try:
            try:
                rec = self.source.read(i)
            except BadRecord as exc:
                raise DataError("bad_json", str(exc)) from None
            rid, where = rec.data.get("id"), f"{rec.file}:{rec.line}"
            names = self._images(rec.data)
            conv = rec.data.get("conversations")
            if not isinstance(conv, list):
                raise DataError("bad_roles", "no 'conversations' list")
            tok = tokenize_conversation(
                conv,
                self.tokenizer,
                self.template,
                num_images=len(names),
                max_length=self.model_max_length,
                image_tokens=self.image_tokens,
            )
            try:
                pixels = [
                    load_image_file(n, self.image_folder, self.max_image_bytes, self.max_image_pixels) for n in names
                ]
            except ImageFileError as exc:
                raise DataError(exc.reason, str(exc)) from None
        except DataError as exc:
            return self._skip(exc.reason, str(exc), rid, where)
        return {
            "input_ids": torch.tensor(tok["input_ids"], dtype=torch.long),
            "labels": torch.tensor(tok["labels"], dtype=torch.long),
            "images": self.processor(pixels) if pixels else None,
            "id": rid,
            "where": where,
        }

    def _skip(self, reason: str, message: str, rid: Any, where: str) -> dict[str, Any]:
        self.skipped[reason] += 1
        log.warning("skipped %s (id %r): %s", where, rid, message)
        bad = sum(self.skipped.values())
        if self.seen >= self.min_seen and bad > self.max_bad_fraction * self.seen:
            worst = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common(3))
            raise RuntimeError(
                f"{bad} of {self.seen} records were bad (more than {self.max_bad_fraction:.1%}); "
                f"most common: {worst}; last: {where} (id {rid!r}): {message}"
            )
        return {"skipped": reason, "id": rid, "where": where, "message": message}

    def modality_lengths(self) -> np.ndarray:
        """Per record, a length estimate for batching: positive for records with images (text
        words + image rows), negative for text-only ones (LLaVA's convention). Unreadable records
        get 0 (their skip is counted when they are read). Computed once, parsing each record."""
        if self._lengths is None:
            out = np.zeros(len(self), np.int64)
            for i in range(len(self)):
                try:
                    rec = self.source.read(i).data
                except BadRecord:
                    continue
                words = sum(
                    len(str(m.get("value", "")).split()) for m in rec.get("conversations") or [] if isinstance(m, dict)
                )
                n_img = len(self._images(rec))
                out[i] = words + n_img * self.image_tokens if n_img else -max(words, 1)
            self._lengths = out
        return self._lengths
