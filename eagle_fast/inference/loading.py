"""load_model: a local checkpoint directory or a tiny preset -> (model, tokenizer, processor),
offline: no name heuristics, no downloads."""

from __future__ import annotations

import os
import tempfile

import torch


def load_model(path_or_preset: str, *, dtype: str | torch.dtype = "auto", device: str = "auto",
               attn_implementation: str | None = None):
    """A directory saved by eagle_fast or in the official NVEagle layout (model, tokenizer and, when
    present, preprocessor_config.json; otherwise the processor follows config.json), or a preset
    name (randomly initialised, with the built-in Llama SentencePiece tokenizer: for tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM, presets
    from eagle_fast.vision.processor import EagleImageProcessor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if os.path.isdir(path_or_preset):
        model = AutoModelForCausalLM.from_pretrained(path_or_preset, dtype=dtype,
                                                     attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path_or_preset)
        processor = EagleImageProcessor.from_pretrained(path_or_preset)
    elif path_or_preset in presets.PRESETS:
        from eagle_fast.train.setup import builtin_tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir(tempfile.mkdtemp(prefix="eagle_fast_")))
        cfg = EagleLlamaConfig(**{**presets.PRESETS[path_or_preset], "vocab_size": len(tokenizer),
                                  "pad_token_id": tokenizer.pad_token_id})
        model = EagleLlamaForCausalLM(cfg).to(dtype)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        processor = EagleImageProcessor.from_model_config(cfg)
    else:
        raise FileNotFoundError(f"{path_or_preset!r} is neither a model directory nor a preset "
                                f"({', '.join(presets.PRESETS)})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model.to(device).eval(), tokenizer, processor
