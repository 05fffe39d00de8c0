"""Building what a training run needs from its config: tokenizer, model (+ image processor),
dataset, and the per-stage trainable set."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from eagle_fast.data import EagleDataset
from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM, presets
from eagle_fast.train.config import BUILTIN_DATA, DATA_WORDS, TrainConfig
from eagle_fast.vision.processor import EagleImageProcessor


def builtin_tokenizer_dir(root: str) -> str:
    """A Llama/Vicuna-format SentencePiece tokenizer (the model shipped in mistral-common), as an HF
    tokenizer folder: the offline default of the tiny recipes (pad = unk, as Vicuna)."""
    import mistral_common

    folder = os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                    os.path.join(folder, "tokenizer.model"))
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
               "model_max_length": 2048, "padding_side": "right"}
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
    return folder


def builtin_data(cfg: TrainConfig):
    """The built-in easy-VQA set (written under output_dir/assets) that recipes without data_path use."""
    if cfg.recipe not in BUILTIN_DATA:
        raise ValueError(f"recipe {cfg.recipe!r} needs data_path and image_folder")
    from eagle_fast.data.builtin import easy_vqa_dataset

    return easy_vqa_dataset(os.path.join(cfg.output_dir, "assets", "easy_vqa"), **BUILTIN_DATA[cfg.recipe])


def data_words_tokenizer_dir(cfg: TrainConfig) -> str:
    """tokenizer_name_or_path = "data:words": a word-level tokenizer built from the training records
    as the built-in templates render them (eagle_fast.data.vocab), saved in output_dir/assets. On
    the built-in set it reads the pretrain and sft records both, so every stage gets the same one;
    with data_path, that file's (point later stages at the first stage's final/ to share it)."""
    from eagle_fast.data.vocab import read_records, rendered_texts, words_tokenizer_dir

    if cfg.data_path is None:
        builtin = builtin_data(cfg)
        paths = [builtin.pretrain, builtin.sft]
    else:
        paths = [cfg.data_path]
    return words_tokenizer_dir(os.path.join(cfg.output_dir, "assets", "tokenizer-words"),
                               rendered_texts(read_records(paths)))


def build_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer_name_or_path == DATA_WORDS:
        path = data_words_tokenizer_dir(cfg)
    else:
        path = cfg.tokenizer_name_or_path or cfg.model_name_or_path or builtin_tokenizer_dir(
            os.path.join(cfg.output_dir, "assets"))
    tok = keep_legacy_flag(AutoTokenizer.from_pretrained(path))
    if tok.pad_token is None:  # Vicuna's convention: pad with unk (the original does the same)
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.model_max_length = cfg.model_max_length
    return tok


def keep_legacy_flag(tok):
    """transformers reads a Llama tokenizer's `legacy` flag but leaves it out of what save_pretrained
    writes, and reloads default to legacy=False: text after a special token ("</s>USER") would then
    tokenize differently from training. Recording the flag keeps saved tokenizers identical."""
    if getattr(tok, "legacy", None) is not None:
        tok.init_kwargs["legacy"] = tok.legacy
    return tok


def build_model(cfg: TrainConfig, tokenizer) -> tuple[EagleLlamaForCausalLM, EagleImageProcessor]:
    overrides: dict[str, Any] = {"mm_projector_type": cfg.mm_projector_type,
                                 "image_aspect_ratio": cfg.image_aspect_ratio,
                                 "tokenizer_model_max_length": cfg.model_max_length}
    if cfg.vision_tower:
        overrides["mm_vision_tower"] = cfg.vision_tower
    if cfg.model_name_or_path is None:
        if cfg.preset not in presets.PRESETS:
            raise ValueError(f"unknown preset {cfg.preset!r}; known: {', '.join(presets.PRESETS)}")
        kw = {**presets.PRESETS[cfg.preset], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              **overrides}
        if cfg.vision_tower and kw.get("mm_expert_configs"):  # keep the sizes of the experts still present
            names = cfg.vision_tower.split(";")
            kw["mm_expert_configs"] = {k: v for k, v in kw["mm_expert_configs"].items() if k in names}
        model = EagleLlamaForCausalLM(EagleLlamaConfig(**kw))
    else:
        from transformers import AutoConfig

        src = AutoConfig.from_pretrained(cfg.model_name_or_path)
        if src.model_type == "eagle_llama":
            model = EagleLlamaForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32)
        else:  # an LLM: the experts and projector are new, shaped as the recipe's preset says
            vision = {k: v for k, v in presets.PRESETS.get(cfg.preset, {}).items()
                      if k in ("mm_vision_tower", "mm_grid", "image_size", "mm_expert_configs")}
            eagle = EagleLlamaConfig(**{**src.to_dict(), **vision, **overrides, "model_type": "eagle_llama"})
            model = EagleLlamaForCausalLM.from_pretrained(cfg.model_name_or_path, config=eagle, dtype=torch.float32)
    if cfg.pretrain_mm_mlp_adapter:
        state = torch.load(cfg.pretrain_mm_mlp_adapter, map_location="cpu", weights_only=True)
        prefix = "model.mm_projector."
        model.model.mm_projector.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                  if k.startswith(prefix)})
    if cfg.prealigned_experts:
        load_prealigned(model, cfg.prealigned_experts)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for e in model.model.vision_tower.vision_towers:
            if hasattr(e.vision_tower, "grad_checkpointing"):
                e.vision_tower.grad_checkpointing = True
    return model, EagleImageProcessor.from_model_config(model.config)


def freeze_for_stage(model: EagleLlamaForCausalLM, cfg: TrainConfig) -> None:
    """pretrain: the projector alone; prealign: the (single) expert and the projector against a
    frozen LLM; sft: everything (the experts too unless freeze_vision)."""
    if cfg.stage == "prealign":
        names = model.model.vision_tower.names
        if len(names) != 1 or names[0] == "clip-448":
            raise ValueError(f"stage 'prealign' aligns one non-CLIP expert at a time: pass --vision_tower "
                             f"with one of convnext-1024, sam-1024, det-1024, pix2struct-1024 (got {names})")
        model.requires_grad_(False)
        model.model.mm_projector.requires_grad_(True)
        model.model.vision_tower.requires_grad_(True)
    elif cfg.stage == "pretrain":
        model.requires_grad_(False)
        model.model.mm_projector.requires_grad_(True)
    else:
        model.requires_grad_(True)
        if cfg.freeze_vision:
            model.model.vision_tower.requires_grad_(False)


def export_prealigned(model: EagleLlamaForCausalLM, folder: str) -> str:
    """Stage 0's result: the aligned expert's weights as {folder}/{expert}.safetensors (keys as in
    the expert module: vision_tower.*), for loading into a mixture with prealigned_experts."""
    from safetensors.torch import save_file

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    (expert,) = base.model.vision_tower.vision_towers
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{expert.spec.name}.safetensors")
    save_file({k: v.detach().contiguous() for k, v in expert.state_dict().items()}, path)
    return path


def load_prealigned(model: EagleLlamaForCausalLM, folder: str) -> list[str]:
    """Loads every {expert}.safetensors found in `folder` into the mixture's expert of that name."""
    from safetensors.torch import load_file

    loaded = []
    for expert in model.model.vision_tower.vision_towers:
        path = os.path.join(folder, f"{expert.spec.name}.safetensors")
        if os.path.exists(path):
            expert.load_state_dict(load_file(path), strict=True)
            loaded.append(expert.spec.name)
    if not loaded:
        raise FileNotFoundError(f"{folder}: no <expert>.safetensors for any of {model.model.vision_tower.names}")
    return loaded


def projector_state(model: EagleLlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The projector with the official stage-1 keys (model.mm_projector.{0,2}.*)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA
    return {f"model.mm_projector.{k}": v.detach().clone() for k, v in base.model.mm_projector.state_dict().items()}


def build_data(cfg: TrainConfig, tokenizer, processor: EagleImageProcessor, model) -> EagleDataset:
    data_path, image_folder = cfg.data_path, cfg.image_folder
    if data_path is None:
        builtin = builtin_data(cfg)
        data_path = builtin.pretrain if cfg.stage == "pretrain" else builtin.sft
        image_folder = builtin.image_folder
    if image_folder is None:
        raise ValueError("image_folder is required with data_path")
    return EagleDataset(data_path, image_folder, tokenizer, processor, cfg.version, cfg.model_max_length,
                        image_tokens=model.config.mm_grid ** 2, seed=cfg.seed, max_bad_fraction=cfg.max_bad_fraction)
