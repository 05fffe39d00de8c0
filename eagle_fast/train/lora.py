"""LoRA / QLoRA on the LLM through peft, with saving, reloading and merging that work.

LoRA adapters go on the LLM's linear layers only (attention and MLP projections of
`model.layers.*`, as LLaVA's find_all_linear_names picks them: never the projector or the
experts). The projector — and the experts when they are trained — stay fully trainable; they are
saved beside the adapter as `non_lora_trainables.safetensors` (the original saved them as a .bin and
then failed to reload them: its merge path imports a misspelled class).

    model = apply_lora(model, cfg)                 # PeftModel; train it
    save_lora(model, "out/")                        # adapter + non-LoRA trainables
    model = load_lora(base_model, "out/")           # the same model again
    merged = merge_lora(base_model, "out/")         # a plain EagleLlamaForCausalLM, same logits
"""

from __future__ import annotations

import os

import torch

from eagle_fast.train.config import TrainConfig

LLM_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
NON_LORA = "non_lora_trainables.safetensors"


def apply_lora(model, cfg: TrainConfig):
    if cfg.bits in (4, 8):
        raise NotImplementedError(f"bits={cfg.bits} (QLoRA) needs bitsandbytes on CUDA; not supported here")
    from peft import LoraConfig, get_peft_model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
                      target_modules=LLM_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():  # everything trainable before, outside the LLM, stays trainable
        if n in trainable and ("mm_projector" in n or ".vision_tower." in n):
            p.requires_grad_(True)
    return peft_model


def _non_lora_state(peft_model) -> dict[str, torch.Tensor]:
    """Everything trained outside the adapters, and the whole projector and experts even when frozen:
    a base that is only an LLM (experts new) then still loads the same model."""
    base = peft_model.get_base_model()
    return {n: p.detach().contiguous() for n, p in base.named_parameters()
            if "lora_" not in n and (p.requires_grad or "mm_projector" in n or ".vision_tower." in n)}


def save_lora(peft_model, path: str) -> None:
    """adapter_model.safetensors + adapter_config.json (peft), the non-LoRA weights, and the Eagle
    config.json that the base is rebuilt with on loading."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    peft_model.save_pretrained(path)
    save_file(_non_lora_state(peft_model), os.path.join(path, NON_LORA))
    peft_model.get_base_model().config.save_pretrained(path)


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
