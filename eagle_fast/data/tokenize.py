"""Conversations -> input ids (with -200 image placeholders) and labels, as the original trains.

Ids: the rendered prompt is split at "<image>" and each chunk tokenized on its own (the
tokenizer's special tokens on the first chunk only), chunks joined by IMAGE_TOKEN_INDEX, as LLaVA's
`tokenizer_image_token`. The original loads the slow tokenizer (`use_fast=False`); for a tokenizer
with a SentencePiece model file (Llama, Vicuna, Yi) the ids are therefore `sentencepiece`'s own,
wrapped the way transformers 4.37's slow `LlamaTokenizer` wraps it (special tokens split out,
`legacy` prefix rules), not the converted fast tokenizer's, whose BPE differs on runs of spaces
and on chunks that start with a space.

Labels of the built-in templates follow the original's rule (NVlabs/EAGLE `eagle/train/train.py`,
LLaVA's `preprocess_plain` / `preprocess_v1` / `preprocess_mpt` and the `preprocess_llama3` of
LLaVA-derived trainers): the text is split into rounds at the round separator, each round is cut at
the assistant marker, and the first N tokens of a round are masked where N is the number of tokens
the instruction part takes when tokenized on its own; a token is learned iff the original learns it
(a reply's first token that merges with the header, like llama3's "\\n\\n" + "\\n", is masked; the
standalone "▁" SentencePiece emits between "ASSISTANT:" and a reply starting with a digit is
learned). The original's constants (BOS, the separator's trailing-space token, the -1 for
non-legacy SentencePiece rounds) correct its stand-alone counts to the counts in context; here each
round is counted in its context (after the separator token), which is what they compute for the
tokenizers they were written for. A record the original would mask entirely (a round without the
assistant marker: an empty last reply, a user turn with no reply, a message holding the marker
itself) raises DataError `no_supervised_tokens` instead of being trained on silently. "hf" masks
by character offsets (tokens overlapping a reply).

Original behaviour reproduced on purpose: empty messages rendered as the original renders them
(templates.py), nothing learned for an empty reply, the whole record dropped where the original
masks it whole (here counted). Not reproduced: llama3's double BOS; whole samples masked because
the original's constants miscount for a tokenizer they were not written for (one without BOS, a
legacy SentencePiece model under chatml); the original keeps the labels before a broken round when
that round starts beyond `model_max_length` tokens, here such a record is dropped too.

Raises DataError with a reason (`bad_roles`, `image_count_mismatch`, `no_supervised_tokens`,
`too_long`) that datasets count.
"""

from __future__ import annotations

import bisect
import os
import re
import weakref
from typing import Any

from eagle_fast.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eagle_fast.data.templates import Template, get_template

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
        turns[0][1] = (IMAGE_TOKEN + "\n" + first).strip()  # as preprocess_multimodal: "<image>" alone has no "\n"
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


def tokenize_conversation(
    conversations: list[dict[str, Any]],
    tokenizer: Any,
    template: str | Template = "vicuna_v1",
    has_image: bool = True,
    num_images: int | None = None,
    max_length: int | None = None,
    image_tokens: int = 1024,
) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one conversation; image positions are -200 (label -100).

    max_length counts each image as `image_tokens` rows; a longer sample is cut at the end, unless
    the cut would split an image or leave no learned token (DataError "too_long")."""
    tpl = get_template(template)
    n_img = (1 if has_image else 0) if num_images is None else num_images
    turns = normalize_turns(conversations, n_img, tpl)
    text, spans = _learned_spans(tpl.render(turns, tokenizer))
    ids, offsets = _encode(text, tokenizer, tpl.adds_bos, with_offsets=tpl.style == "hf")
    if tpl.style == "hf":  # no original to follow: tokens overlapping a reply are learned
        labels = [
            tok if tok != IMAGE_TOKEN_INDEX and b > a and any(a < e and b > s for s, e in spans) else IGNORE_INDEX
            for tok, (a, b) in zip(ids, offsets)
        ]
    else:
        labels = _original_labels(text, ids, tpl, tokenizer)
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError("no_supervised_tokens", "no assistant reply to learn")
    if max_length is not None:
        ids, labels = _truncate(ids, labels, max_length, image_tokens)
    return {"input_ids": ids, "labels": labels}


def _original_labels(text: str, ids: list[int], tpl: Template, tokenizer: Any) -> list[int]:
    """The original's masks: preprocess_plain, preprocess_v1 (style "two") and preprocess_mpt /
    preprocess_llama3 (style "mpt"), with each round counted in its context (module docstring)."""
    labels = list(ids)
    if tpl.style == "plain":  # the tokens of "<image>" alone are masked (BOS and the placeholder)
        n = len(_encode(IMAGE_TOKEN, tokenizer, tpl.adds_bos)[0])
        return [IGNORE_INDEX] * n + labels[n:]
    if tpl.style == "two":  # rounds end at sep2 ("</s>"); the instruction ends with " ASSISTANT: "
        round_sep, marker, trailing = tpl.sep2, f"{tpl.sep}{tpl.assistant}: ", 1
        rounds = text.split(round_sep)
    else:  # rounds end at sep; regrouped as system + user + assistant, then user + assistant
        round_sep, marker, trailing = tpl.sep, tpl.sep + tpl.assistant, 0
        parts = text.split(round_sep)
        rounds = [round_sep.join(parts[:3])] + [round_sep.join(parts[j : j + 2]) for j in range(3, len(parts), 2)]
    sep_ids = _encode(round_sep, tokenizer, False)[0]
    if len(sep_ids) != 1:
        raise ValueError(
            f"template {tpl.name!r}: {round_sep!r} is {len(sep_ids)} tokens for this tokenizer; the "
            f"template needs it as one special token (add it with tokenizer.add_special_tokens)"
        )

    def count(piece: str, k: int) -> int:  # tokens `piece` takes where round k starts
        if k == 0:
            return len(_encode(piece, tokenizer, tpl.adds_bos)[0])
        return len(_encode(round_sep + piece, tokenizer, False)[0]) - 1

    cur, why = 0, ""
    for k, rnd in enumerate(rounds):
        if rnd == "":
            break
        halves = rnd.split(marker)
        if len(halves) != 2:  # the original stops here; what follows is masked
            why = (
                f"round {k} holds the assistant marker {marker!r} {len(halves) - 1} times (an empty or missing "
                f"reply, or a message containing the marker)"
            )
            break
        n_instr = count(halves[0] + marker, k) - trailing
        labels[cur : cur + n_instr] = [IGNORE_INDEX] * max(0, min(n_instr, len(ids) - cur))
        cur += count(rnd, k) + 1  # the round's tokens and its separator token
    labels[cur:] = [IGNORE_INDEX] * max(0, len(ids) - cur)
    if cur != len(ids):  # the original's "tokenization mismatch": it masks the whole sample
        why = why or "its rounds count a separator token the text does not have (an empty last reply)"
        raise DataError(
            "no_supervised_tokens",
            f"the original trainer masks this whole sample: {why}; {cur} of {len(ids)} tokens accounted for",
        )
    return [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in labels]


def encode_prompt(text: str, tokenizer: Any, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Rendered text -> ids with -200 for each "<image>" (chunks tokenized on their own, special
    tokens on the first only, as the original's tokenizer_image_token) and each id's character
    span in `text` ((0, 0) for added special tokens and image placeholders). SentencePiece
    tokenizers encode as the original's slow tokenizer (module docstring)."""
    return _encode(text, tokenizer, add_bos)


def _encode(text: str, tokenizer: Any, add_bos: bool = True, with_offsets: bool = True):
    """encode_prompt; offsets are all (0, 0) unless with_offsets (the masks of the built-in
    templates count tokens and need none)."""
    spm = _slow_sentencepiece(tokenizer)
    if with_offsets and spm is None and not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast tokenizer or a SentencePiece model file is needed (character offsets)")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    base = 0
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((0, 0))
            base += len(IMAGE_TOKEN)
        if spm is not None:
            chunk_ids, chunk_offsets = spm.encode(chunk, (k == 0 and add_bos), with_offsets)
        else:
            enc = tokenizer(chunk, add_special_tokens=(k == 0 and add_bos), return_offsets_mapping=with_offsets)
            chunk_ids = enc["input_ids"]
            chunk_offsets = enc["offset_mapping"] if with_offsets else [(0, 0)] * len(chunk_ids)
        ids += chunk_ids
        offsets += [(a + base, b + base) if b > a else (0, 0) for a, b in chunk_offsets]
        base += len(chunk)
    return ids, offsets


SPIECE_UNDERLINE = "▁"
_SPM_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, Any]]" = weakref.WeakKeyDictionary()


def _slow_sentencepiece(tokenizer: Any) -> "_SlowSentencePiece | None":
    """The slow-tokenizer emulation for a tokenizer whose `vocab_file` (or the tokenizer.model in
    the folder it was loaded from) is a SentencePiece model of its vocabulary size; None for others
    (Llama-3's tiktoken BPE, GPT-2 BPE, word-level, a tokenizer.json without its tokenizer.model)."""
    try:
        hit = _SPM_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        hit = None
    if hit is not None and hit[0] == len(tokenizer):  # rebuilt when tokens were added since
        return hit[1]
    spm = None
    path = getattr(tokenizer, "vocab_file", None)
    folder = str(getattr(tokenizer, "name_or_path", "") or "")
    if not isinstance(path, str) and folder and os.path.isdir(folder):  # loaded from tokenizer.json
        path = os.path.join(folder, "tokenizer.model")
    if isinstance(path, str) and path.endswith(".model") and os.path.isfile(path):
        import sentencepiece

        try:
            proc = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError):  # e.g. a tiktoken file named tokenizer.model
            proc = None
        if proc is not None and proc.get_piece_size() == tokenizer.vocab_size:
            spm = _SlowSentencePiece(tokenizer, proc)
    try:
        _SPM_CACHE[tokenizer] = (len(tokenizer), spm)
    except TypeError:
        pass
    return spm


class _SlowSentencePiece:
    """transformers 4.37's `LlamaTokenizer(use_fast=False)` (the original's tokenizer) on top of
    `sentencepiece`: added tokens split out of the text (honouring their lstrip/rstrip), every
    other chunk encoded by the model. legacy=True: each chunk gets SentencePiece's dummy "▁"
    prefix, after special tokens too. legacy=False: the model's dummy prefix is off, the text gets
    one "▁" in front, and chunks after a special token get none."""

    def __init__(self, tokenizer: Any, proc: Any):
        legacy = getattr(tokenizer, "legacy", None)
        self.legacy = True if legacy is None else bool(legacy)  # 4.37's default when unset
        if not self.legacy:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto.FromString(proc.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            proc = type(proc)(model_proto=proto.SerializeToString())
        self.sp = proc
        self.unk = str(tokenizer.unk_token)
        self.unk_len = len(proc.encode(self.unk))
        self.added = {
            str(t): (i, bool(getattr(t, "lstrip", False)), bool(getattr(t, "rstrip", False)))
            for i, t in tokenizer.added_tokens_decoder.items()
        }
        self.special = set(map(str, tokenizer.all_special_tokens))
        names = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        # what tokenizer(text) puts around the text (BOS, EOS), read from the tokenizer itself
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        at = next((j for j in range(len(full) - len(plain) + 1) if full[j : j + len(plain)] == plain), 0)
        self.prefix, self.suffix = full[:at], full[at + len(plain) :]

    def encode(
        self, text: str, add_special_tokens: bool = True, with_offsets: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        shift = 0
        if not self.legacy and text:
            text, shift = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), 1
        pieces = self.split.split(text) if self.split else [text]
        spans, pos = [], 0  # (start, end, is_added) of each non-empty piece
        for j, p in enumerate(pieces):
            spans.append([pos, pos + len(p), j % 2 == 1])
            pos += len(p)
        for j in range(1, len(spans), 2):  # an added token's lstrip / rstrip eats the spaces beside it
            _, lstrip, rstrip = self.added[text[spans[j][0] : spans[j][1]]]
            if rstrip and j + 1 < len(spans):
                nxt = spans[j + 1]
                nxt[0] = min(nxt[1], nxt[0] + len(text[nxt[0] : nxt[1]]) - len(text[nxt[0] : nxt[1]].lstrip()))
            if lstrip:
                prv = spans[j - 1]
                prv[1] = max(prv[0], prv[0] + len(text[prv[0] : prv[1]].rstrip()))
        out: list[tuple[int, int, int, bool]] = []  # (id, start, end, is_added)
        for a, b, is_added in spans:
            if is_added:
                out.append((self.added[text[a:b]][0], a, b, True))
            elif b > a:
                out += [(i, a + x, a + y, False) for i, x, y in self._chunk(text[a:b], with_offsets)]
        if (
            not self.legacy
            and len(out) > 1
            and self.sp.id_to_piece(out[0][0]) == SPIECE_UNDERLINE
            and not out[0][3]
            and text[out[1][1] : out[1][2]] in self.special
        ):
            out = out[1:]  # 4.37: no "▁" in front of a leading special token
        ids = [i for i, *_ in out]
        offsets = [(max(a - shift, 0), max(b - shift, 0)) for _, a, b, _ in out]
        if add_special_tokens:
            ids = self.prefix + ids + self.suffix
            offsets = [(0, 0)] * len(self.prefix) + offsets + [(0, 0)] * len(self.suffix)
        return ids, offsets

    def _chunk(self, chunk: str, with_offsets: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, end) of one chunk without added tokens, as 4.37's `_tokenize`."""
        skip, lead = 0, ""
        if not self.legacy and chunk.startswith((SPIECE_UNDERLINE, " ")):  # encode "<unk>" + chunk, drop "<unk>"
            skip, lead = self.unk_len, self.unk
        src = lead + chunk
        if not with_offsets:
            return [(i, 0, 0) for i in self.sp.encode(src)[skip:]]
        pieces = self.sp.encode(src, return_type="proto").pieces[skip:]
        if src.isascii():  # bytes are characters
            return [(p.id, max(p.begin - len(lead), 0), max(p.end - len(lead), 0)) for p in pieces]
        starts = [0]  # byte offset of each character of src (SentencePiece reports bytes)
        for ch in src:
            starts.append(starts[-1] + len(ch.encode("utf-8")))
        res = []
        for p in pieces:
            a = bisect.bisect_right(starts, p.begin) - 1 - len(lead)
            b = bisect.bisect_left(starts, p.end) - len(lead)
            res.append((p.id, max(a, 0), max(b, 0)))
        return res


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
        raise DataError(
            "too_long", f"{sequence_length(ids, image_tokens)} rows > {max_length}: the cut splits an image"
        )
    if all(x == IGNORE_INDEX for x in labels[:keep]):
        raise DataError(
            "too_long", f"{sequence_length(ids, image_tokens)} rows > {max_length}: no learned token is left"
        )
    return ids[:keep], labels[:keep]
