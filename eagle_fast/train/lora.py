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

QLoRA (`bits=4` or `8`): the same LoRA targets are first replaced by frozen bitsandbytes layers
(4-bit NF4 with double quantization, as the QLoRA paper and LLaVA's `--bits 4` use, or 8-bit
LLM.int8), on CPU as on CUDA. Quantization is deterministic, so a run that resumes rebuilds the
same quantized base from the same weights; checkpoints hold everything but the quantized weights.
The saved base stays in full precision: `load_lora` / `merge_lora` on it give the full-precision
model plus the adapter (what QLoRA deployments merge into); `quantize_llm` on the base first
reproduces the training-time model exactly.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from eagle_fast.model.lora import NON_LORA, load_lora, merge_lora  # noqa: F401  (re-exported)
from eagle_fast.train.config import TrainConfig

LLM_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def quantize_llm(model: nn.Module, bits: int, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replaces, in place, every LoRA target linear of the LLM (LLM_TARGETS) by its frozen
    bitsandbytes version: 4 -> Linear4bit (NF4, double quantization, matmuls in compute_dtype),
    8 -> Linear8bitLt (int8 weights, outlier threshold 6). Returns the replaced module names."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: QLoRA quantizes to 4 or 8 bits (16 = no quantization)")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"bits={bits} (QLoRA) needs bitsandbytes: pip install bitsandbytes") from exc
    target = re.compile(LLM_TARGETS)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and target.fullmatch(n)]
    if not names:
        raise ValueError(f"bits={bits}: the model has no LLM linear layers matching {LLM_TARGETS}")
    for name in names:
        parent, child = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        lin: nn.Linear = getattr(owner, child)
        w, has_bias = lin.weight.detach(), lin.bias is not None
        if bits == 4:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
            )
            q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(owner, child, q.to(w.device))  # moving to a device is what quantizes the weight
    return names


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())


def trainer_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a checkpoint keeps to resume: everything, except under QLoRA the quantized LLM
    weights and their statistics (rebuilt bit for bit from the base when the run resumes). Tied
    tensors (embeddings = LM head) are kept once each name, as separate copies."""
    quantized = tuple(n + "." for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes"))
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if quantized and k.startswith(quantized):
            continue
        v = v.detach()
        out[k] = v.clone() if v.data_ptr() in seen else v  # safetensors refuses shared storage
        seen.add(v.data_ptr())
    return out


def apply_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    if cfg.bits != 16:
        quantize_llm(model, cfg.bits, torch.bfloat16 if cfg.bf16 else torch.float32)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.lora_bias,
        target_modules=LLM_TARGETS,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():  # everything trainable before, outside the LLM, stays trainable
        if n in trainable and ("mm_projector" in n or ".vision_tower." in n):
            p.requires_grad_(True)
    return peft_model


def _non_lora_state(peft_model) -> dict[str, torch.Tensor]:
    """Everything trained outside the adapters, and the whole projector and experts even when frozen:
    a base that is only an LLM (experts new) then still loads the same model."""
    base = peft_model.get_base_model()
    return {
        n: p.detach().contiguous()
        for n, p in base.named_parameters()
        if "lora_" not in n and (p.requires_grad or "mm_projector" in n or ".vision_tower." in n)
    }


def save_lora(peft_model, path: str) -> None:
    """adapter_model.safetensors + adapter_config.json (peft), the non-LoRA weights, and the Eagle
    config.json that the base is rebuilt with on loading."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    peft_model.save_pretrained(path)
    save_file(_non_lora_state(peft_model), os.path.join(path, NON_LORA))
    peft_model.get_base_model().config.save_pretrained(path)
