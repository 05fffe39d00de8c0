"""load_model: a local checkpoint directory, a LoRA adapter directory or a tiny preset ->
(model, tokenizer, processor), offline: no name heuristics, no downloads."""

from __future__ import annotations

import json
import os
import re
import tempfile

import torch


def _resolve(device: str, dtype) -> tuple[str, torch.dtype]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def _check_keys(path: str, info: dict, allowed_missing: set[str] = frozenset()) -> None:
    """A checkpoint that does not match its config is an error naming the keys, not a model with
    silently random weights."""
    missing = sorted(set(info.get("missing_keys", ())) - set(allowed_missing))
    unexpected = sorted(info.get("unexpected_keys", ()))
    if missing or unexpected:

        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = ([f"missing {len(missing)} key(s): {show(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)} key(s): {show(unexpected)}"] if unexpected else []
        )
        raise ValueError(f"{path}: the checkpoint does not match its config.json; " + "; ".join(parts))


# The original EVA-02 expert registers its RoPE tables as persistent buffers, and Eagle's trainer
# saves them: rope_win / rope_glb of the ViT and, the same modules again, every block's attn.rope
# (52 keys in X5-7B). They are functions of the config; this model recomputes them.
_EVA_ROPE_KEY = re.compile(
    r"^(?P<vit>.+)\.(?:rope_(?P<table>win|glb)|blocks\.(?P<block>\d+)\.attn\.rope)\.freqs_(?P<fn>cos|sin)$"
)
# The original computes the tables in fp32 (arguments up to ~16 rad): within 1e-6 of exact.
_ROPE_FP32_SLACK = 1e-6


def _checkpoint_tensors(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint directory (safetensors or torch .bin, sharded or not)."""
    from safetensors import safe_open

    files: dict[str, str] = {}
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                weight_map = json.load(f)["weight_map"]
            files = {k: weight_map[k] for k in keys}
            break
        if os.path.isfile(os.path.join(path, single)):
            files = dict.fromkeys(keys, single)
            break
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their index)")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(files.values())):
        wanted = [k for k, f in files.items() if f == name]
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with safe_open(full, "pt") as f:
                out.update({k: f.get_tensor(k) for k in wanted})
        else:
            state = torch.load(full, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: state[k] for k in wanted})
    return out


def _accept_eva_rope_tables(path: str, model, unexpected: list[str]) -> list[str]:
    """`unexpected` without the original EVA-02 RoPE buffers, each checked against the table this
    model computes for its config (equal within the stored dtype's rounding, else an error naming
    the key). Keys of any other module are returned untouched."""
    from eagle_fast.vision.experts.eva import EvaViT

    vits = {name: m for name, m in model.named_modules() if isinstance(m, EvaViT)}
    found = {k: m for k in unexpected if (m := _EVA_ROPE_KEY.match(k)) and m["vit"] in vits}
    if not found:
        return unexpected
    stored = _checkpoint_tensors(path, sorted(found))
    tables = {name: vit._rope_tables() for name, vit in vits.items()}
    for key, m in sorted(found.items()):
        vit = vits[m["vit"]]
        table = m["table"]
        if table is None:  # a block's attn.rope: the window table in windowed blocks, else the global one
            block = int(m["block"])
            if block >= len(vit.blocks):
                raise ValueError(f"{path}: {key}: block {block} does not exist ({len(vit.blocks)} blocks)")
            table = "win" if vit.blocks[block].window else "glb"
        want = tables[m["vit"]][table][0 if m["fn"] == "cos" else 1]
        got = stored[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(got.shape)}, but this config's "
                f"{'window' if table == 'win' else 'global'} RoPE table is {tuple(want.shape)}"
            )
        allowed = torch.finfo(got.dtype).eps + _ROPE_FP32_SLACK if got.is_floating_point() else 0.0
        diff = (got.double() - want.double()).abs().max().item()
        if not diff <= allowed:  # also catches NaN
            raise ValueError(
                f"{path}: {key} differs from the RoPE table this config computes by {diff:.3g} "
                f"(allowed for {got.dtype}: {allowed:.3g}); the checkpoint was made for "
                f"another EVA-02 geometry or is corrupt"
            )
    return [k for k in unexpected if k not in found]


def _from_dir(path: str, dtype, attn_implementation, config=None):
    from eagle_fast.model import EagleLlamaForCausalLM

    model, info = EagleLlamaForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
    )
    return model, info


def _lora_base(path: str, base: str | None) -> str:
    with open(os.path.join(path, "adapter_config.json")) as f:
        named = base or json.load(f).get("base_model_name_or_path")
    for cand in (named, os.path.join(path, named or "")):
        if named and os.path.isdir(cand):
            return cand
    raise FileNotFoundError(
        f"{path}: LoRA adapter whose base model {named!r} is not a local directory; "
        f"pass base=DIR (the model the adapter was trained on)"
    )


def _load_lora(path: str, base: str | None, dtype, attn_implementation):
    """Base weights + the adapter + the non-LoRA weights (projector, experts), merged into a plain
    model. The base may be an Eagle checkpoint or only its LLM: the Eagle config comes from `path`."""
    from safetensors import safe_open

    from eagle_fast.model import EagleLlamaConfig
    from eagle_fast.model.lora import NON_LORA, merge_lora

    base_dir = _lora_base(path, base)
    config = EagleLlamaConfig.from_pretrained(path)
    model, info = _from_dir(base_dir, dtype, attn_implementation, config=config)
    with safe_open(os.path.join(path, NON_LORA), "pt") as f:
        provided = set(f.keys())
    _check_keys(base_dir, {"missing_keys": info.get("missing_keys", ())}, allowed_missing=provided)
    return merge_lora(model, path)


def load_model(
    path_or_preset: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    base: str | None = None,
):
    """A directory saved by eagle_fast or in the official NVEagle layout (model, tokenizer and, when
    present, preprocessor_config.json; otherwise the processor follows config.json); a LoRA adapter
    directory (adapter_config.json; its base from `base` or the adapter's base_model_name_or_path,
    merged on load); or a preset name (randomly initialised, with the built-in Llama SentencePiece
    tokenizer: for tests and benchmarks). A checkpoint whose keys do not match its config raises,
    listing them; the EVA-02 RoPE tables official checkpoints store are checked against the ones
    this model computes and dropped (a mismatch raises, naming the key)."""
    from transformers import AutoTokenizer

    from eagle_fast.data.tokenizers import builtin_tokenizer_dir, keep_legacy_flag
    from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM, presets
    from eagle_fast.vision.processor import EagleImageProcessor

    device, dtype = _resolve(device, dtype)
    if os.path.isdir(path_or_preset):
        if os.path.isfile(os.path.join(path_or_preset, "adapter_config.json")):
            model = _load_lora(path_or_preset, base, dtype, attn_implementation)
        else:
            model, info = _from_dir(path_or_preset, dtype, attn_implementation)
            unexpected = _accept_eva_rope_tables(path_or_preset, model, list(info.get("unexpected_keys", ())))
            _check_keys(path_or_preset, {**info, "unexpected_keys": unexpected})
        tokenizer = keep_legacy_flag(AutoTokenizer.from_pretrained(path_or_preset))
        processor = EagleImageProcessor.from_pretrained(path_or_preset)
    elif path_or_preset in presets.PRESETS:
        tokenizer = keep_legacy_flag(
            AutoTokenizer.from_pretrained(builtin_tokenizer_dir(tempfile.mkdtemp(prefix="eagle_fast_")))
        )
        cfg = EagleLlamaConfig(
            **{**presets.PRESETS[path_or_preset], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        )
        model = EagleLlamaForCausalLM(cfg).to(dtype)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        processor = EagleImageProcessor.from_model_config(cfg)
    else:
        raise FileNotFoundError(
            f"{path_or_preset!r} is neither a model directory nor a preset ({', '.join(presets.PRESETS)})"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model.to(device).eval(), tokenizer, processor
