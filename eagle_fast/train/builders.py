"""Building what a training run needs from its config: tokenizer, model (+ image processor),
dataset, and the per-stage trainable set."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import torch

from eagle_fast.data import EagleDataset
from eagle_fast.data.tokenizers import builtin_tokenizer_dir, keep_legacy_flag  # noqa: F401  (re-exported)
from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM, presets
from eagle_fast.train.checkpoint import safe_load
from eagle_fast.train.config import BUILTIN_DATA, DATA_WORDS, TrainConfig
from eagle_fast.train.expert_sources import Source, parse_sources, resolve_all
from eagle_fast.train.pretrained import assemble
from eagle_fast.vision.experts import EXPERTS
from eagle_fast.vision.processor import EagleImageProcessor


def builtin_data(cfg: TrainConfig):
    """The built-in easy-VQA set (written under output_dir/assets) that recipes without data_path use."""
    if cfg.recipe not in BUILTIN_DATA:
        raise ValueError(f"recipe {cfg.recipe!r} needs data_path and image_folder")
    from eagle_fast.data.easy_vqa import easy_vqa_dataset

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
    return words_tokenizer_dir(
        os.path.join(cfg.output_dir, "assets", "tokenizer-words"), rendered_texts(read_records(paths))
    )


def build_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer_name_or_path == DATA_WORDS:
        path = data_words_tokenizer_dir(cfg)
    else:
        path = (
            cfg.tokenizer_name_or_path
            or cfg.model_name_or_path
            or builtin_tokenizer_dir(os.path.join(cfg.output_dir, "assets"))
        )
    tok = keep_legacy_flag(AutoTokenizer.from_pretrained(path))
    if tok.pad_token is None:  # Vicuna's convention: pad with unk (the original does the same)
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.model_max_length = cfg.model_max_length
    return tok


class TokenizerFiles:
    """A tokenizer's save_pretrained plus its SentencePiece model: transformers 5 writes
    tokenizer.json but not tokenizer.model, and a folder without it reloads on the converted fast
    tokenizer, whose ids differ from the SentencePiece ids the model was trained on (runs of
    spaces). Copies the model the tokenizer was loaded with, when it has one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def source(self) -> str | None:
        path = getattr(self.tokenizer, "vocab_file", None)
        folder = str(getattr(self.tokenizer, "name_or_path", "") or "")
        if not isinstance(path, str) and folder and os.path.isdir(folder):
            path = os.path.join(folder, "tokenizer.model")
        return path if isinstance(path, str) and path.endswith(".model") and os.path.isfile(path) else None

    def save_pretrained(self, folder: str):
        out = self.tokenizer.save_pretrained(folder)
        src, dst = self.source(), os.path.join(folder, "tokenizer.model")
        if src is not None and not os.path.exists(dst):
            shutil.copyfile(src, dst)
        return out


def build_model(
    cfg: TrainConfig, tokenizer, meta: bool = False, rank: int = 0, world: int = 1
) -> tuple[EagleLlamaForCausalLM, EagleImageProcessor]:
    """The run's model (+ its image processor). meta: shapes only, on the meta device, no weights
    read (a rank that receives its weights from rank 0: eagle_fast.train.materialize). Experts that
    are new (a preset, or an LLM checkpoint) start from `vision_tower_weights` when it names them."""
    overrides: dict[str, Any] = {
        "mm_projector_type": cfg.mm_projector_type,
        "image_aspect_ratio": cfg.image_aspect_ratio,
        "tokenizer_model_max_length": cfg.model_max_length,
    }
    if cfg.vision_tower:
        overrides["mm_vision_tower"] = cfg.vision_tower
    llm = None  # the LLM checkpoint under new experts
    if cfg.model_name_or_path is None:
        if cfg.preset not in presets.PRESETS:
            raise ValueError(f"unknown preset {cfg.preset!r}; known: {', '.join(presets.PRESETS)}")
        kw = {
            **presets.PRESETS[cfg.preset],
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
        config = EagleLlamaConfig(**_keep_present_experts(kw, cfg.vision_tower))
    else:
        from transformers import AutoConfig

        src = AutoConfig.from_pretrained(cfg.model_name_or_path)
        if src.model_type == "eagle_llama":
            config = src
        else:  # an LLM: the experts and projector are new, shaped as the recipe's preset says
            llm = cfg.model_name_or_path
            vision = {
                k: v
                for k, v in presets.PRESETS.get(cfg.preset, {}).items()
                if k in ("mm_vision_tower", "mm_grid", "image_size", "mm_expert_configs")
            }
            config = EagleLlamaConfig(
                **_keep_present_experts(
                    {**src.to_dict(), **vision, **overrides, "model_type": "eagle_llama"}, cfg.vision_tower
                )
            )
    fresh = cfg.model_name_or_path is None or llm is not None
    sources = expert_sources(cfg, config, fresh)
    resolved = resolve_all(sources, rank, world, needed=not meta) if sources else {}
    # the dtype the run keeps its weights in: DeepSpeed's bf16 mode holds a bf16 module (fp32 masters
    # in its optimizer), so loading in bf16 halves rank 0's host copy and changes nothing; DDP
    # (autocast) and FSDP2 (MixedPrecisionPolicy) keep fp32 parameters
    dtype = torch.bfloat16 if cfg.deepspeed and cfg.bf16 else torch.float32
    if meta:
        model = _construct(config, meta)
    elif resolved:
        model = assemble(config, llm, resolved, dtype)
    elif llm is not None:  # under ZeRO-3 (a live HfDeepSpeedConfig) transformers loads into the partitions
        model = EagleLlamaForCausalLM.from_pretrained(llm, config=config, dtype=dtype)
    elif cfg.model_name_or_path is not None:
        model = EagleLlamaForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=dtype)
    else:
        model = _construct(config, meta)
    if cfg.pretrain_mm_mlp_adapter and not meta:
        state = safe_load(cfg.pretrain_mm_mlp_adapter)  # tensors only: a crafted pickle is refused by name
        prefix = "model.mm_projector."
        with _gathered(model.model.mm_projector):
            if _writer():
                model.model.mm_projector.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                )
    if cfg.prealigned_experts and not meta:
        load_prealigned(model, cfg.prealigned_experts)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for e in model.model.vision_tower.vision_towers:
            if hasattr(e.vision_tower, "grad_checkpointing"):
                e.vision_tower.grad_checkpointing = True
    return model, EagleImageProcessor.from_model_config(model.config)


def _keep_present_experts(kw: dict[str, Any], vision_tower: str | None) -> dict[str, Any]:
    """A mixture override keeps the preset's sizes of the experts still present, and only those."""
    if vision_tower and kw.get("mm_expert_configs"):
        names = vision_tower.split(";")
        kw = {**kw, "mm_expert_configs": {k: v for k, v in kw["mm_expert_configs"].items() if k in names}}
    return kw


def expert_sources(cfg: TrainConfig, config: EagleLlamaConfig, fresh: bool) -> dict[str, Source]:
    """The weight sources of the mixture's experts (entries for experts not in this mixture are left
    out, with a notice); none when the experts come from an Eagle checkpoint."""
    text = cfg.vision_tower_weights
    if not text or text == "none":
        return {}
    if not fresh:
        print(f"vision_tower_weights: not used, the experts come from {cfg.model_name_or_path}", flush=True)
        return {}
    names = config.mm_vision_tower.split(";")
    sources = parse_sources(text, known=tuple(EXPERTS))
    absent = [n for n in sources if n not in names]
    if absent:
        print(f"vision_tower_weights: {', '.join(absent)} not in this mixture ({config.mm_vision_tower})", flush=True)
    return {n: s for n, s in sources.items() if n in names}


def _construct(config: EagleLlamaConfig, meta: bool) -> EagleLlamaForCausalLM:
    """A fresh model: on the meta device, or (under ZeRO-3) partitioned as transformers builds it
    (each module initialised on rank 0, then partitioned), or plainly on the host."""
    if meta:
        with torch.device("meta"):
            return EagleLlamaForCausalLM(config)
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return EagleLlamaForCausalLM._from_config(config)
    return EagleLlamaForCausalLM(config)


def _gathered(module):
    """Full parameters of `module` for the duration under ZeRO-3, rank 0 the writer; else nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def _writer() -> bool:
    """Whether this process writes loaded weights: every process, except under ZeRO-3 only rank 0."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return not is_deepspeed_zero3_enabled() or torch.distributed.get_rank() == 0


def freeze_for_stage(model: EagleLlamaForCausalLM, cfg: TrainConfig) -> None:
    """pretrain: the projector alone; prealign: the (single) expert and the projector against a
    frozen LLM; sft: everything (the experts too unless freeze_vision)."""
    if cfg.stage == "prealign":
        names = model.model.vision_tower.names
        if len(names) != 1 or names[0] == "clip-448":
            raise ValueError(
                f"stage 'prealign' aligns one non-CLIP expert at a time: pass --vision_tower "
                f"with one of convnext-1024, sam-1024, det-1024, pix2struct-1024 (got {names})"
            )
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
            with _gathered(expert):
                if _writer():
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
    return EagleDataset(
        data_path,
        image_folder,
        tokenizer,
        processor,
        cfg.version,
        cfg.model_max_length,
        image_tokens=model.config.mm_grid**2,
        seed=cfg.seed,
        max_bad_fraction=cfg.max_bad_fraction,
    )
