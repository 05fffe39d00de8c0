"""Splicing image features into token embeddings (LLaVA's convention, batched and checked).

`input_ids` carry IMAGE_TOKEN_INDEX (-200) where an image goes. Image features arrive as one
(T, hidden) block per image, in order of appearance across the batch (sample 0's images first).
Each -200 is replaced by its image's T rows; the new sequences are re-padded on the side the
batch was padded on (left padding is detected from the mask), labels of image rows and padding are
IGNORE_INDEX, position ids count the real tokens. A count mismatch raises naming the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eagle_fast.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: F401  (re-exported)


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # (B, L, hidden)
    attention_mask: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L)


def count_images(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
    """Number of image placeholders in each sample (padding excluded)."""
    is_img = input_ids == IMAGE_TOKEN_INDEX
    if attention_mask is not None:
        is_img &= attention_mask.bool()
    return is_img.sum(1).tolist()


def splice(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_features: list[torch.Tensor] | torch.Tensor,
    embed: torch.nn.Module,
) -> Spliced:
    b, n = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    counts = count_images(input_ids, mask)
    n_images = len(image_features)
    if sum(counts) != n_images:
        first_bad, seen = None, 0
        for i, c in enumerate(counts):  # the first sample whose placeholders run past the images
            if seen + c > n_images:
                first_bad = i
                break
            seen += c
        where = (
            f"sample {first_bad} is the first without enough images"
            if first_bad is not None
            else (f"{n_images - sum(counts)} image(s) are left over after the last sample")
        )
        raise ValueError(
            f"splice: the batch has {sum(counts)} image placeholder(s) ({IMAGE_TOKEN_INDEX}) per sample "
            f"{counts} but {n_images} image(s) were given; {where}"
        )
    left_padded = bool((~mask[:, 0] & mask[:, -1]).any())
    safe_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, 0)
    text = embed(safe_ids)  # (B, N, hidden)
    rows, row_labels, k = [], [], 0
    for i in range(b):
        valid = mask[i].nonzero().squeeze(1)
        ids, emb = input_ids[i, valid], text[i, valid]
        lab = labels[i, valid] if labels is not None else None
        parts, part_labels, start = [], [], 0
        for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().squeeze(1).tolist():
            parts += [emb[start:pos], image_features[k].to(emb.dtype)]
            if lab is not None:
                part_labels += [lab[start:pos], lab.new_full((image_features[k].shape[0],), IGNORE_INDEX)]
            start, k = pos + 1, k + 1
        parts.append(emb[start:])
        rows.append(torch.cat(parts))
        if lab is not None:
            part_labels.append(lab[start:])
            row_labels.append(torch.cat(part_labels))
    length = max(r.shape[0] for r in rows)
    hidden = text.shape[-1]
    out = text.new_zeros(b, length, hidden)
    new_mask = torch.zeros(b, length, dtype=torch.long, device=input_ids.device)
    new_labels = None if labels is None else labels.new_full((b, length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        sl = slice(length - r.shape[0], length) if left_padded else slice(0, r.shape[0])
        out[i, sl] = r
        new_mask[i, sl] = 1
        if new_labels is not None:
            new_labels[i, sl] = row_labels[i]
    position_ids = (new_mask.cumsum(1) - 1).clamp(min=0)
    return Spliced(out, new_mask, position_ids, new_labels)
