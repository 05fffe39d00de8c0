"""Named Eagle configurations: the official models' real dimensions, and tiny ones for CPU work.

    from eagle_fast.model import presets
    cfg = presets.get("eagle-x5-7b")                      # EagleLlamaConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)     # no memory, no weights looked for

`python -m eagle_fast.model.presets` prints every preset's parameter counts (LLM, projector, each
expert). Tiny presets keep every expert of the mixture, with small widths and depths, a 64-pixel
canvas and a 4 x 4 grid: same code paths, forward + backward in well under a second on a CPU.
"""

from __future__ import annotations

import sys

from eagle_fast.model.config import EagleLlamaConfig

X4 = "clip-448;convnext-1024;det-1024;pix2struct-1024"
X5 = "clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"

# LLM backbones (HF Llama-family configs of the models Eagle was trained from)
VICUNA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VICUNA_13B = dict(
    VICUNA_7B,
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
)
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=128000,
    eos_token_id=128001,
)
YI_34B = dict(
    vocab_size=64000,
    hidden_size=7168,
    intermediate_size=20480,
    num_hidden_layers=60,
    num_attention_heads=56,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Every expert at toy size: 64-pixel canvas, CLIP at 56 (4 x 4 tokens), 16 Pix2Struct patches.
TINY_EXPERTS = {
    "clip-448": dict(
        image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    ),
    "convnext-1024": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), image_size=64, num_classes=10),
    "sam-1024": dict(
        image_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=64,
        window_size=2,
        global_attn_indexes=[1],
        output_channels=8,
    ),
    "det-1024": dict(
        image_size=64,
        patch_size=8,
        dim=32,
        depth=3,
        heads=2,
        mlp_hidden=40,
        window=4,
        global_blocks=(1,),
        pretrain_grid=3,
    ),
    "pix2struct-1024": dict(
        hidden_size=32,
        d_ff=64,
        d_kv=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_patches=16,
        image_size=64,
        seq_len=64,
    ),
}
TINY_LLM = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _tiny(mixture: str) -> dict:
    names = mixture.split(";")
    return dict(
        TINY_LLM,
        mm_vision_tower=mixture,
        mm_grid=4,
        image_size=64,
        mm_expert_configs={n: TINY_EXPERTS[n] for n in names},
    )


# A mid-size model for CPU benchmarks: SmolLM2-135M's LLM shape and the official 32 x 32 grid
# (1024 image rows per image), narrow experts on a 512-pixel canvas (CLIP at its real 448).
SMALL_EXPERTS = {
    "clip-448": dict(
        image_size=448,
        patch_size=14,
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=3,
    ),
    "convnext-1024": dict(depths=(1, 1, 3, 1), dims=(48, 96, 192, 384), image_size=512, num_classes=10),
    "sam-1024": dict(
        image_size=512,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_dim=512,
        window_size=8,
        global_attn_indexes=[1, 3],
        output_channels=64,
    ),
    "det-1024": dict(
        image_size=512,
        patch_size=16,
        dim=128,
        depth=4,
        heads=4,
        mlp_hidden=342,
        window=8,
        global_blocks=(1, 3),
        pretrain_grid=16,
    ),
    "pix2struct-1024": dict(
        hidden_size=128,
        d_ff=512,
        d_kv=32,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_patches=1024,
        image_size=512,
        seq_len=1024,
    ),
}
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# The CPU demo (recipe "demo"): two experts at their own resolutions on a 128-pixel canvas (easy-VQA's
# 64-pixel images upscaled): CLIP ViT at 64 (16-pixel patches, 4 x 4 tokens) and ConvNeXt at 128
# (4 x 4 stage-4 map), fused on a 4 x 4 grid; a 2-layer Llama; vocab_size follows the tokenizer.
DEMO_EXPERTS = {
    "clip-448": dict(
        image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
    ),
    # blocks on from the start (layer scale 1, not timm's 1e-6): trained from scratch in minutes, a
    # ConvNeXt whose blocks start as the identity learns colours but not shapes
    "convnext-1024": dict(
        depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), image_size=128, num_classes=10, layer_scale_init=1.0
    ),
}
DEMO_LLM = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.1,
)

PRESETS: dict[str, dict] = {
    "eagle-x4-7b": dict(VICUNA_7B, mm_vision_tower=X4),
    "eagle-x5-7b": dict(VICUNA_7B, mm_vision_tower=X5),
    "eagle-x4-13b": dict(VICUNA_13B, mm_vision_tower=X4),
    "eagle-x5-13b": dict(VICUNA_13B, mm_vision_tower=X5),
    "eagle-x4-8b-plus": dict(LLAMA3_8B, mm_vision_tower=X4),
    "eagle-x5-34b": dict(YI_34B, mm_vision_tower=X5),
    "eagle-tiny-x4": _tiny(X4),
    "eagle-tiny-x5": _tiny(X5),
    "eagle-tiny-clip": _tiny("clip-448"),
    "eagle-demo": dict(
        DEMO_LLM, mm_vision_tower="clip-448;convnext-1024", mm_grid=4, image_size=128, mm_expert_configs=DEMO_EXPERTS
    ),
    "eagle-small-x5": dict(
        SMOLLM2_135M, mm_vision_tower=X5, mm_grid=32, image_size=512, mm_expert_configs=SMALL_EXPERTS
    ),
}


def get(name: str, **overrides) -> EagleLlamaConfig:
    """The named preset as an EagleLlamaConfig (keyword overrides applied)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return EagleLlamaConfig(**{**PRESETS[name], **overrides})


def parameter_counts(name: str) -> dict[str, int]:
    """Parameters of the preset's LLM, projector and each expert, counted on the meta device."""
    import torch

    from eagle_fast.model.eagle import EagleLlamaForCausalLM

    with torch.device("meta"):
        model = EagleLlamaForCausalLM(get(name))
    inner = model.model
    counts = {e.spec.name: sum(p.numel() for p in e.parameters()) for e in inner.vision_tower.vision_towers}
    counts["projector"] = sum(p.numel() for p in inner.mm_projector.parameters())
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["llm"] = counts["total"] - counts["projector"] - sum(counts[e] for e in inner.vision_tower.names)
    return counts


def _human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def main(argv: list[str] | None = None) -> int:
    from eagle_fast.cli import ConfigParser

    p = ConfigParser("python -m eagle_fast.model.presets", "Parameter counts of the model presets (meta device).")
    p.add_argument("names", nargs="*", metavar="PRESET", help=f"presets to count (default: all): {', '.join(PRESETS)}")
    names = p.parse_args(argv).names or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    for name in names:
        c = {k: _human(v) for k, v in parameter_counts(name).items()}
        experts = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("llm", "projector", "total"))
        print(f"{name}: total {c['total']} = LLM {c['llm']} + projector {c['projector']} + experts ({experts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
