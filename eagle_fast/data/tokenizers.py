"""Tokenizers every layer needs: the built-in Llama/Vicuna SentencePiece tokenizer (the offline
default of the tiny recipes and presets) and keeping a Llama tokenizer's `legacy` flag through
saves, so training and inference tokenize alike."""

from __future__ import annotations

import json
import os
import shutil


def builtin_tokenizer_dir(root: str) -> str:
    """A Llama/Vicuna-format SentencePiece tokenizer (the model shipped in mistral-common), as an HF
    tokenizer folder: the offline default of the tiny recipes (pad = unk, as Vicuna)."""
    import mistral_common

    folder = os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        os.makedirs(folder, exist_ok=True)
        shutil.copy(
            os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
            os.path.join(folder, "tokenizer.model"),
        )
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "model_max_length": 2048,
            "padding_side": "right",
        }
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
    return folder


def keep_legacy_flag(tok):
    """transformers reads a Llama tokenizer's `legacy` flag but leaves it out of what save_pretrained
    writes, and reloads default to legacy=False: text after a special token ("</s>USER") would then
    tokenize differently from training. Recording the flag keeps saved tokenizers identical."""
    if getattr(tok, "legacy", None) is not None:
        tok.init_kwargs["legacy"] = tok.legacy
    return tok
