"""Conversations -> input ids (with -200 image placeholders) and labels, exactly.

The prompt is rendered by a template into segments (learned or not), then tokenized as the original
does: split at "<image>", each chunk tokenized on its own (the tokenizer's special tokens on the
first chunk only), chunks joined by IMAGE_TOKEN_INDEX. A token is learned when its characters
overlap a learned segment, read from the fast tokenizer's offsets, so the label mask follows the
text itself: the original's "tokenization mismatch" (whole samples silently masked when its
per-round token arithmetic disagreed with the tokenizer) cannot arise.

Raises DataError with a reason (`bad_roles`, `image_count_mismatch`, `no_supervised_tokens`,
`too_long`) that datasets count.
"""

from __future__ import annotations

from typing import Any

from eagle_fast.data.templates import Template, get_template
from eagle_fast.model.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A record that cannot be trained on; `reason` is one of the dataset's report keys."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def normalize_turns(conversations: list[dict[str, Any]], num_images: int, template: Template) -> list[tuple[str, str]]:
    """LLaVA records -> [(role, text)], alternating user / assistant, with "<image>" placed as the
    original trains: one image -> "<image>\\n" at the start of the first user turn (added there if
    missing); several images -> placeholders kept in order; the count must match the images."""
    turns = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise DataError("bad_roles", f"turn {i} is not a {{'from', 'value'}} message")
        role = ROLES.get(msg.get("from"))
        if role is None:
            raise DataError("bad_roles", f"turn {i} has role {msg.get('from')!r} (human, gpt)")
        turns.append([role, msg["value"]])
    if not turns or any(r != ("user" if i % 2 == 0 else "assistant") for i, (r, _) in enumerate(turns)):
        raise DataError("bad_roles", f"roles {[r for r, _ in turns]} do not alternate user/assistant from a user turn")
    found = sum(t.count(IMAGE_TOKEN) for _, t in turns)
    if num_images == 1 and found <= 1:
        if found and IMAGE_TOKEN not in turns[0][1]:
            raise DataError("image_count_mismatch", "the <image> placeholder is not in the first user turn")
        first = turns[0][1].replace(IMAGE_TOKEN, "").strip()
        turns[0][1] = IMAGE_TOKEN + "\n" + first
    elif found != num_images:
        raise DataError("image_count_mismatch", f"{found} <image> placeholder(s) for {num_images} image(s)")
    if template.style == "plain":  # stage-1 captions: the user turn is the image alone
        if num_images != 1 or len(turns) != 2:
            raise DataError("bad_roles", "template 'plain' takes one image and one (user, caption) pair")
        turns[0][1] = IMAGE_TOKEN
    return [(r, t) for r, t in turns]


def _learned_spans(segments) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for s in segments:
        if s.learn and s.text:
            spans.append((len(text), len(text) + len(s.text)))
        text += s.text
    return text, spans


def tokenize_conversation(conversations: list[dict[str, Any]], tokenizer: Any, template: str | Template = "vicuna_v1",
                          has_image: bool = True, num_images: int | None = None,
                          max_length: int | None = None, image_tokens: int = 1024) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one conversation; image positions are -200 (label -100).

    max_length counts each image as `image_tokens` rows; a longer sample is cut at the end, unless
    the cut would split an image or leave no learned token (DataError "too_long")."""
    tpl = get_template(template)
    n_img = (1 if has_image else 0) if num_images is None else num_images
    turns = normalize_turns(conversations, n_img, tpl)
    text, spans = _learned_spans(tpl.render(turns, tokenizer))
    ids, offsets = encode_prompt(text, tokenizer, tpl.adds_bos)
    labels = [tok if tok != IMAGE_TOKEN_INDEX and b > a and any(a < e and b > s for s, e in spans) else IGNORE_INDEX
              for tok, (a, b) in zip(ids, offsets)]
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError("no_supervised_tokens", "no assistant reply to learn")
    if max_length is not None:
        ids, labels = _truncate(ids, labels, max_length, image_tokens)
    return {"input_ids": ids, "labels": labels}


def encode_prompt(text: str, tokenizer: Any, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Rendered text -> ids with -200 for each "<image>" (chunks tokenized on their own, special
    tokens on the first only, as the original's tokenizer_image_token) and each id's character
    span in `text` ((0, 0) for added special tokens and image placeholders)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast tokenizer is needed (character offsets)")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    base = 0
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((0, 0))
            base += len(IMAGE_TOKEN)
        enc = tokenizer(chunk, add_special_tokens=(k == 0 and add_bos), return_offsets_mapping=True)
        ids += enc["input_ids"]
        offsets += [(a + base, b + base) if b > a else (0, 0) for a, b in enc["offset_mapping"]]
        base += len(chunk)
    return ids, offsets


def sequence_length(ids: list[int], image_tokens: int) -> int:
    """Rows the model sees: text tokens plus image_tokens per placeholder."""
    n_img = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
    return len(ids) - n_img + n_img * image_tokens


def _truncate(ids, labels, max_length, image_tokens):
    if sequence_length(ids, image_tokens) <= max_length:
        return ids, labels
    keep, rows = 0, 0
    for t in ids:
        step = image_tokens if t == IMAGE_TOKEN_INDEX else 1
        if rows + step > max_length:
            break
        rows, keep = rows + step, keep + 1
    n_img = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
    if sum(1 for t in ids[:keep] if t == IMAGE_TOKEN_INDEX) != n_img:
        raise DataError("too_long", f"{sequence_length(ids, image_tokens)} rows > {max_length}: the cut splits an image")
    if all(x == IGNORE_INDEX for x in labels[:keep]):
        raise DataError("too_long", f"{sequence_length(ids, image_tokens)} rows > {max_length}: no learned token is left")
    return ids[:keep], labels[:keep]
