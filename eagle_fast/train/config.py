"""Training configuration: one dataclass (the original Eagle/LLaVA flag names, same meanings) and
named recipes returning it.

    cfg = recipe("tiny-x5", stage="sft", output_dir="runs/t", max_steps=20)
    cfg = recipe("eagle-x5-7b", stage="pretrain", data_path=..., image_folder=...)

Official recipes reproduce the original training scripts' hyper-parameters:
stage 1 (pretrain) projector only, lr 1e-3, global batch 256; stage 2 (sft) everything, lr 2e-5,
global batch 128; both 1 epoch, cosine, 3% warmup, wd 0, bf16, max length 2048, gradient
checkpointing, DeepSpeed ZeRO-2 (launch under torchrun or deepspeed). Tiny recipes run on a CPU in minutes on the built-in easy-VQA data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from eagle_fast.train.expert_sources import OFFICIAL_SOURCES, format_sources

STAGES = ("prealign", "pretrain", "sft")


@dataclass
class TrainConfig:
    recipe: str = "tiny-x5"
    stage: str = "sft"
    output_dir: str = "runs/tiny-x5"
    # model
    preset: str = "eagle-tiny-x5"  # used when model_name_or_path is None
    model_name_or_path: str | None = None  # an Eagle checkpoint, or an LLM to put the experts on
    vision_tower: str | None = None  # mixture override, e.g. "clip-448;convnext-1024"
    mm_projector_type: str = "mlp2x_gelu"
    pretrain_mm_mlp_adapter: str | None = None  # mm_projector.bin of stage 1
    tune_mm_mlp_adapter: bool = False  # the original's stage-1 switch (= stage "pretrain")
    freeze_vision: bool = False
    prealigned_experts: str | None = None  # directory of {expert}.safetensors written by stage "prealign"
    vision_tower_weights: str | None = field(
        default=None,
        metadata={
            "help": (
                "where new experts' weights come from: 'expert=source;...', a source being a local file or directory, "
                "a hub repo id, or repo:file, each optionally @revision (eagle_fast.train.expert_sources). The official "
                "recipes name the original's encoders; 'none': random experts. Unused when model_name_or_path is an "
                "Eagle checkpoint"
            )
        },
    )
    tokenizer_name_or_path: str | None = None  # None: the checkpoint's, or the built-in Llama SentencePiece
    # LoRA on the LLM's linear layers (peft); the projector (and unfrozen experts) train fully
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    bits: int = 16  # 4 / 8: QLoRA, the LoRA targets quantized by bitsandbytes (NF4 / int8; CPU or CUDA)
    # data
    version: str = "vicuna_v1"  # conversation template
    data_path: str | None = None  # None on tiny recipes: the built-in easy-VQA set
    image_folder: str | None = None
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    group_by_modality_length: bool = False
    packing: bool | None = field(
        default=None,
        metadata={
            "help": (
                "pack each micro-batch's records into one row (varlen attention per record, positions restarting): "
                "the same records per step and the same per-token loss as padded batches, without the padding's "
                "compute. default None: on for the pretrain and sft stages, off for prealign"
            )
        },
    )
    dataloader_num_workers: int = 0
    max_bad_fraction: float = 0.01
    # optimisation
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    mm_projector_lr: float | None = None
    vision_tower_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    max_grad_norm: float = 1.0
    bf16: bool = False
    tf32: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # torch.compile the training forward (graph breaks at the image splice)
    seed: int = 0
    # checkpoints and logs
    save_steps: int = 500
    # 2, not the original's 1: with a single checkpoint kept, one damaged save leaves nothing to resume from
    save_total_limit: int = 2
    resume: str | None = None  # "auto" or a checkpoint directory
    logging_steps: int = 1  # a metrics.jsonl row (losses averaged) every N optimizer steps, and the last
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": (
                "a step whose loss or gradient norm is NaN / inf is skipped (weights and optimizer untouched) and "
                "logged; more than this many in a row stop the run, `latest` left on the last good checkpoint"
            )
        },
    )
    stop_timeout_s: float = field(
        default=600.0,
        metadata={
            "help": (
                "after SIGTERM / SIGUSR1 the run finishes its step, saves and exits 0; if it has not exited this many "
                "seconds after the signal (a lost rank, a hung collective) it exits with status 1. 0: no limit"
            )
        },
    )
    deepspeed: str | None = None
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP, when run on several ranks without DeepSpeed
    device: str | None = None  # None: cuda:$LOCAL_RANK with CUDA, else cpu (eagle_fast.train.device)

    def __post_init__(self) -> None:
        if self.tune_mm_mlp_adapter and self.stage == "sft":
            self.stage = "pretrain"  # the original expresses stage 1 with this flag
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r}: one of {STAGES}")
        if self.bits not in (4, 8, 16):
            raise ValueError(f"bits={self.bits}: 4 or 8 (QLoRA) or 16 (no quantization)")
        if self.bits != 16 and not self.lora_enable:
            raise ValueError(f"bits={self.bits} quantizes the LLM for QLoRA training: pass --lora_enable too")
        if self.logging_steps < 1:
            raise ValueError(f"logging_steps={self.logging_steps}: must be >= 1")
        if self.max_nonfinite_steps < 0 or self.stop_timeout_s < 0:
            raise ValueError("max_nonfinite_steps and stop_timeout_s must be >= 0")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch size and gradient accumulation must be >= 1")

    def packs(self) -> bool:
        """`packing`, or when None the stage's default: on for pretrain and sft, off for prealign
        (resolved here, not in __post_init__, so that `replace(stage=...)` gets its own default)."""
        return self.stage != "prealign" if self.packing is None else self.packing

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class Recipe:
    """A named recipe as plain data: `settings` for every stage, then `stages[stage]` on top;
    `builtin_data`: options of the built-in easy-VQA builder (eagle_fast.data.easy_vqa) used when
    data_path is None, or None when the recipe needs data_path."""

    settings: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    builtin_data: dict[str, Any] | None = None


DATA_WORDS = "data:words"  # tokenizer_name_or_path: built from the training records (train/builders.py)

# The official scripts' settings; global batch = per-device x accumulation x 32 GPUs there
_OFFICIAL = dict(
    vision_tower_weights=format_sources(OFFICIAL_SOURCES),
    model_max_length=2048,
    bf16=True,
    tf32=True,
    gradient_checkpointing=True,
    deepspeed="zero2",
    weight_decay=0.0,
    warmup_ratio=0.03,
    lr_scheduler_type="cosine",
    num_train_epochs=1.0,
    dataloader_num_workers=4,
    save_steps=24000,
    save_total_limit=2,
)  # the original keeps 1: nothing to fall back to past a damaged checkpoint
_OFFICIAL_STAGES = {
    "pretrain": dict(learning_rate=1e-3, per_device_train_batch_size=8, image_aspect_ratio="square", version="plain"),
    "sft": dict(
        learning_rate=2e-5, per_device_train_batch_size=4, image_aspect_ratio="pad", group_by_modality_length=True
    ),
    "prealign": dict(learning_rate=1e-3, per_device_train_batch_size=8, image_aspect_ratio="pad"),
}
_TINY = dict(version="vicuna_v1", model_max_length=256, save_steps=50, per_device_train_batch_size=8, warmup_ratio=0.05)
_TINY_STAGES = {
    "pretrain": dict(learning_rate=3e-3, version="plain"),
    "sft": dict(learning_rate=1e-3),
    "prealign": dict(learning_rate=3e-3),
}
# The demo: eagle-demo on the built-in easy-VQA set with a word-level tokenizer built from it, sized
# to train both stages on a 2-core CPU in minutes; one multi-turn record per image (all its
# questions), the 500 highest-id train images held out as the validation split its recipe is chosen on
DEMO_STAGE = {
    "pretrain": dict(learning_rate=3e-3, version="plain", per_device_train_batch_size=32, num_train_epochs=1.0),
    "sft": dict(learning_rate=2e-3, per_device_train_batch_size=32, num_train_epochs=2.0),
    "prealign": dict(learning_rate=3e-3, per_device_train_batch_size=32),
}

RECIPES: dict[str, Recipe] = {
    "eagle-x4-7b": Recipe(dict(_OFFICIAL, preset="eagle-x4-7b", version="vicuna_v1"), _OFFICIAL_STAGES),
    "eagle-x5-7b": Recipe(dict(_OFFICIAL, preset="eagle-x5-7b", version="vicuna_v1"), _OFFICIAL_STAGES),
    "eagle-x4-13b": Recipe(dict(_OFFICIAL, preset="eagle-x4-13b", version="vicuna_v1"), _OFFICIAL_STAGES),
    "eagle-x5-13b": Recipe(dict(_OFFICIAL, preset="eagle-x5-13b", version="vicuna_v1"), _OFFICIAL_STAGES),
    "eagle-x4-8b-plus": Recipe(dict(_OFFICIAL, preset="eagle-x4-8b-plus", version="llama3"), _OFFICIAL_STAGES),
    "eagle-x5-34b": Recipe(dict(_OFFICIAL, preset="eagle-x5-34b", version="chatml"), _OFFICIAL_STAGES),
    "tiny-x4": Recipe(dict(_TINY, preset="eagle-tiny-x4"), _TINY_STAGES, builtin_data={}),
    "tiny-x5": Recipe(dict(_TINY, preset="eagle-tiny-x5"), _TINY_STAGES, builtin_data={}),
    "demo": Recipe(
        dict(
            preset="eagle-demo",
            tokenizer_name_or_path=DATA_WORDS,
            version="chatml",
            model_max_length=512,
            save_steps=0,
            warmup_ratio=0.05,
            weight_decay=0.0,
        ),
        DEMO_STAGE,
        builtin_data=dict(val_images=500),
    ),
}
# recipes that train on the built-in easy-VQA set when data_path is None -> its builder's options
BUILTIN_DATA: dict[str, dict[str, Any]] = {n: r.builtin_data for n, r in RECIPES.items() if r.builtin_data is not None}


def recipe(name: str, stage: str = "sft", **overrides: Any) -> TrainConfig:
    """The named recipe for `stage`, with keyword overrides (unknown keys are an error)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: one of {STAGES}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}")
    r = RECIPES[name]
    return TrainConfig(
        **{
            "recipe": name,
            "stage": stage,
            "output_dir": f"runs/{name}-{stage}",
            **r.settings,
            **r.stages[stage],
            **overrides,
        }
    )
