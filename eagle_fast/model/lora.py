"""Loading a LoRA-trained Eagle: the peft adapter on its base, plus the weights trained outside the
adapters (projector, experts) that eagle_fast saves beside it as non_lora_trainables.safetensors;
and merging them into a plain model. What training writes is in eagle_fast.train.lora; this is what
inference needs, so it lives with the model.
"""

from __future__ import annotations

import os

NON_LORA = "non_lora_trainables.safetensors"


def load_lora(base_model, path: str, trainable: bool = False):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(base_model, path, is_trainable=trainable)
    extra = load_file(os.path.join(path, NON_LORA))
    missing, unexpected = model.get_base_model().load_state_dict(extra, strict=False)
    if unexpected:
        raise RuntimeError(f"{path}: {NON_LORA} holds keys the model lacks: {sorted(unexpected)[:5]}")
    return model


def merge_lora(base_model, path: str, out_dir: str | None = None):
    """base + adapter + non-LoRA trainables -> a plain model (saved in HF format when out_dir)."""
    merged = load_lora(base_model, path).merge_and_unload()
    if out_dir:
        merged.save_pretrained(out_dir, safe_serialization=True)
    return merged
