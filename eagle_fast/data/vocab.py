"""Word-level tokenizers built from a dataset's own text: a vocabulary of a few hundred tokens
instead of a pretrained LLM's tens of thousands, for small models trained from scratch (the LM
head and embeddings shrink with it).

    tok = words_tokenizer(rendered_texts(read_records(["pretrain.jsonl", "sft.jsonl"])))
    tok.save_pretrained("tokenizer/")          # AutoTokenizer.from_pretrained("tokenizer/") reloads it

Text is lowercased (by default: "What ..." typed in a chat reads as the data's "what ..."), then
split as GPT-2 does (byte-level: words with their leading space, punctuation, newlines); each piece
is one token, and decoding restores the (lowercased) text exactly. A piece outside the vocabulary
becomes <unk>. Ids 0, 1, 2 are <unk>, <s>, </s> (pad = <unk>, Vicuna's convention); <s> starts
every encoded text; the chat templates' markers (</s>, <|im_start|>, ...) are special tokens.
The vocabulary is a function of the text alone: built twice from the same records, it is the same.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable

from eagle_fast.data.templates import TEMPLATES, get_template
from eagle_fast.data.tokenize import IMAGE_TOKEN, DataError, normalize_turns

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_MARKER = re.compile(r"<\|[^|<>]+\|>")  # <|im_start|>, <|eot_id|>, ...
RENDERED = ("plain", "vicuna_v1", "llama3", "chatml")  # the built-in templates that need no tokenizer


def template_markers() -> list[str]:
    """Marker tokens of the built-in templates (<|im_start|>, <|eot_id|>, ...), sorted."""
    fixed = [s for t in TEMPLATES.values() for s in (t.system, t.user, t.assistant, t.sep, t.sep2, t.stop)]
    return sorted({m for text in fixed for m in _MARKER.findall(text)})


def read_records(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """LLaVA-format records of JSON-list or JSONL files, in order."""
    records: list[dict] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if os.fspath(path).endswith(".jsonl"):
                records += [json.loads(line) for line in f if line.strip()]
            else:
                records += json.load(f)
    return records


def rendered_texts(records: Iterable[dict], templates: Iterable[str] = RENDERED) -> list[str]:
    """Each record's conversation as each template renders it for training, and each of its user
    turns as a generation prompt: the exact text a model trained or run on those templates is
    fed, so every piece of it (" ASSISTANT", " yes" after "ASSISTANT:", ...) is seen. Records a
    template cannot render (several turns under "plain") are skipped for that template."""
    tpls = [get_template(t) for t in templates]
    texts = []
    for rec in records:
        conv = rec.get("conversations") or []
        n_img = 1 if rec.get("image") else 0
        for tpl in tpls:
            try:
                turns = normalize_turns(conv, n_img, tpl)
            except DataError:
                continue
            texts.append("".join(s.text for s in tpl.render(turns)))
            for k in range(0, len(turns), 2):
                texts.append("".join(s.text for s in tpl.render(turns[k : k + 1], add_generation_prompt=True)))
    return texts


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def words_tokenizer(texts: Iterable[str], min_count: int = 1, lowercase: bool = True, model_max_length: int = 2048):
    """A transformers fast tokenizer whose vocabulary is every piece of `texts` seen at least
    `min_count` times, most frequent first (ties in code-point order), after the special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS] + template_markers()
    split = re.compile("|".join(re.escape(s) for s in specials + [IMAGE_TOKEN]))  # as encode_prompt splits
    pre = _pre_tokenizer()
    parts = Counter(part for text in texts for part in split.split(text) if part)
    counts: Counter[str] = Counter()
    for part, n in parts.items():  # parts repeat a lot (turns, system prompts): pre-tokenize each once
        for piece, _ in pre.pre_tokenize_str(part.lower() if lowercase else part):
            counts[piece] += n
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(specials + words)}

    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    if lowercase:  # special tokens are matched before normalization: "<|im_start|>" stays one token
        core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,
        additional_special_tokens=template_markers(),
        model_max_length=model_max_length,
        padding_side="right",
    )
    return tok


def words_tokenizer_dir(
    folder: str | os.PathLike, texts: Iterable[str], min_count: int = 1, lowercase: bool = True
) -> str:
    """`words_tokenizer(texts, ...)` saved in `folder` (rebuilt when missing or when the saved one
    differs: vocabulary or normalizer); returns the folder."""
    folder = os.fspath(folder)
    tok = words_tokenizer(texts, min_count, lowercase)
    try:
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(folder)
        if (
            saved.get_vocab() == tok.get_vocab()
            and saved.backend_tokenizer.normalizer.__class__ == tok.backend_tokenizer.normalizer.__class__
        ):
            return folder
    except (OSError, ValueError):
        pass
    tok.save_pretrained(folder)
    return folder
