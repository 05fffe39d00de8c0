"""A fresh Eagle assembled from released weights: the LLM's checkpoint plus each expert's own
(eagle_fast.train.expert_sources says where they are, eagle_fast.vision.weights converts them).

Everything is handed to transformers' loader as one state dict, so the model is built on the meta
device and only what no source provides — the projector, SAM's new neck, a head Eagle never runs,
the LLM when there is none — is initialised: no expert is randomly initialised and then overwritten.
Under ZeRO-3 (a live HfDeepSpeedConfig) the same call loads into the partitions.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM


def _llm_files(name_or_path: str) -> list[str]:
    """The LLM checkpoint's weight files (a local directory or a hub id, through transformers' cache)."""
    from transformers.utils.hub import cached_file

    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        path = cached_file(name_or_path, index, _raise_exceptions_for_missing_entries=False)
        if path:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [cached_file(name_or_path, s) for s in shards]
        path = cached_file(name_or_path, single, _raise_exceptions_for_missing_entries=False)
        if path:
            return [path]
    raise FileNotFoundError(f"{name_or_path}: no model.safetensors or pytorch_model.bin (or their index)")


def llm_state(name_or_path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers.modeling_utils import load_state_dict

    state: dict[str, torch.Tensor] = {}
    for path in _llm_files(name_or_path):
        state.update({k: v.to(dtype) for k, v in load_state_dict(path).items()})
    return state


def expert_states(
    config: EagleLlamaConfig, resolved: dict[str, tuple[str, dict[str, Any]]], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """({model key: tensor} of every expert with a source, {expert: record for the saved config}).
    Shapes come from a meta-device copy of the model (no memory)."""
    from eagle_fast.vision.weights import convert, read_native

    with torch.device("meta"):
        skeleton = EagleLlamaForCausalLM(config)
    mixture = skeleton.model.vision_tower
    state, records = {}, {}
    for i, expert in enumerate(mixture.vision_towers):
        name = expert.spec.name
        if name not in resolved:
            continue
        path, record = resolved[name]
        conv = convert(name, read_native(name, path), expert)
        prefix = f"model.vision_tower.vision_towers.{i}."
        state.update({prefix + k: v.to(dtype) for k, v in conv.state.items()})
        print(f"{conv.summary()}  <- {record['source']}", flush=True)
        records[name] = {
            **record,
            "loaded": len(conv.loaded),
            "new": conv.new,
            "mismatched": conv.mismatched,
            "unused": len(conv.unused),
        }
    return state, records


def assemble(
    config: EagleLlamaConfig, llm: str | None, resolved: dict[str, tuple[str, dict[str, Any]]], dtype: torch.dtype
) -> EagleLlamaForCausalLM:
    """The model from the LLM checkpoint `llm` (None: a new LLM, as a preset's) and the resolved
    expert sources, in `dtype`; the sources recorded as config.mm_vision_tower_sources."""
    state, records = expert_states(config, resolved, dtype)
    if llm is not None:
        state.update(llm_state(llm, dtype))
    model = EagleLlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    del state
    model.config.mm_vision_tower_sources = records
    return model
