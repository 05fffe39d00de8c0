"""Toy-size native checkpoints laid out as the official releases Eagle starts from, made with the
native libraries (transformers' save_pretrained, timm's ConvNeXt) or, for EVA-02's detectron2 file,
with key names written out from EVA's ViTDet definition. Sizes are the eagle-tiny experts'."""

from __future__ import annotations

import torch

from eagle_fast.model.presets import TINY_EXPERTS
from eagle_fast.vision.experts.clip import ClipConfig
from eagle_fast.vision.experts.eva import EvaConfig
from eagle_fast.vision.experts.pix2struct import Pix2StructConfig
from eagle_fast.vision.experts.sam import SamConfig

TINY = TINY_EXPERTS


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (LayerNorms included, so that swapped norms would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def clip_model(**vision_overrides):
    """A CLIPModel (the layout of openai/clip-vit-large-patch14-336) with the tiny vision tower."""
    from transformers import CLIPConfig, CLIPModel

    vision = ClipConfig(**TINY["clip-448"]).hf().to_dict()
    vision.update(vision_overrides)
    text = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))).eval()


def timm_convnext(num_classes: int | None = None):
    """timm's ConvNeXt with the tiny depths/dims and Eagle's LayerNorm eps."""
    from timm.models.convnext import ConvNeXt

    cfg = TINY["convnext-1024"]
    return randomize(
        ConvNeXt(depths=cfg["depths"], dims=cfg["dims"], num_classes=num_classes or cfg["num_classes"], norm_eps=1e-5)
    ).eval()


def sam_model():
    """A SamModel (the layout of facebook/sam-vit-large) with the tiny image encoder."""
    from transformers import SamConfig as HFSamConfig
    from transformers import SamModel

    vision = SamConfig(**TINY["sam-1024"]).hf().to_dict()
    prompt = dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16, iou_head_hidden_dim=8)
    cfg = HFSamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    return randomize(SamModel(cfg)).eval()


def pix2struct_model():
    """A Pix2StructForConditionalGeneration (the layout of google/pix2struct-large), tiny encoder."""
    from transformers import Pix2StructConfig as HFPix2StructConfig
    from transformers import Pix2StructForConditionalGeneration

    vision = Pix2StructConfig(**TINY["pix2struct-1024"]).hf().to_dict()
    text = dict(vocab_size=64, hidden_size=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1)
    model = Pix2StructForConditionalGeneration(HFPix2StructConfig(vision_config=vision, text_config=text))
    return randomize(model).eval()


# EVA-02 ViTDet (EVA repo, EVA-02/det/detectron2/modeling/backbone/vit.py): the ViT `net` inside the
# SimpleFeaturePyramid `backbone` of a detectron2 GeneralizedRCNN, so its keys are `backbone.net.*`.
# Shapes in terms of D (embed dim), H (SwiGLU hidden: int(D * 8/3) in EVA-02, the config's in the tiny
# preset), P (patch), N (1 + pretrain grid^2: the 224-pixel pre-training table with a CLS entry).
EVA_TOP = {"patch_embed.proj.weight": ("D", 3, "P", "P"), "patch_embed.proj.bias": ("D",), "pos_embed": (1, "N", "D")}
EVA_BLOCK = {
    "norm1.weight": ("D",),
    "norm1.bias": ("D",),
    "attn.q_proj.weight": ("D", "D"),
    "attn.k_proj.weight": ("D", "D"),
    "attn.v_proj.weight": ("D", "D"),
    "attn.q_bias": ("D",),
    "attn.v_bias": ("D",),  # no k bias in EVA's attention
    "attn.proj.weight": ("D", "D"),
    "attn.proj.bias": ("D",),
    "norm2.weight": ("D",),
    "norm2.bias": ("D",),
    "mlp.w1.weight": ("H", "D"),
    "mlp.w1.bias": ("H",),
    "mlp.w2.weight": ("H", "D"),
    "mlp.w2.bias": ("H",),
    "mlp.ffn_ln.weight": ("H",),
    "mlp.ffn_ln.bias": ("H",),  # SwiGLU with subln=True
    "mlp.w3.weight": ("D", "H"),
    "mlp.w3.bias": ("D",),
}
# Detector parts around the ViT (a few of each kind), all unused by Eagle.
EVA_DETECTOR = {
    "backbone.simfp_2.0.weight": (32, 16, 2, 2),
    "backbone.simfp_2.1.weight": (16,),
    "backbone.simfp_3.0.weight": (32, 16, 2, 2),
    "backbone.simfp_4.0.weight": (8, 32, 1, 1),
    "proposal_generator.rpn_head.conv.weight": (8, 8, 3, 3),
    "roi_heads.box_predictor.0.cls_score.weight": (366, 16),
    "roi_heads.mask_head.predictor.weight": (1, 8, 1, 1),
    "pixel_mean": (3, 1, 1),
    "pixel_std": (3, 1, 1),
}


def eva_vitdet_state(seed: int = 0, with_block_rope: bool = False) -> dict[str, torch.Tensor]:
    """A detectron2 ViTDet detector state for the tiny det-1024 config: the ViT under `backbone.net.`,
    its RoPE tables `rope_win` / `rope_glb` (and, as a model state_dict stores shared modules under
    every path, `blocks.N.attn.rope.*`), and detector heads."""
    cfg = EvaConfig(**TINY["det-1024"])
    sizes = {"D": cfg.dim, "H": cfg.mlp_hidden, "P": cfg.patch_size, "N": 1 + cfg.pretrain_grid**2}
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn([sizes.get(s, s) for s in shape], generator=g) * 0.2

    state = {f"backbone.net.{k}": rand(s) for k, s in EVA_TOP.items()}
    for i in range(cfg.depth):
        state.update({f"backbone.net.blocks.{i}.{k}": rand(s) for k, s in EVA_BLOCK.items()})
    head_dim = cfg.dim // cfg.heads
    for name, n in (("rope_win", cfg.window), ("rope_glb", cfg.grid)):
        for part in ("freqs_cos", "freqs_sin"):
            state[f"backbone.net.{name}.{part}"] = rand((n * n, head_dim))
    if with_block_rope:
        for i in range(cfg.depth):
            n = cfg.grid if i in cfg.global_blocks else cfg.window
            for part in ("freqs_cos", "freqs_sin"):
                state[f"backbone.net.blocks.{i}.attn.rope.{part}"] = rand((n * n, head_dim))
    state.update({k: rand(s) for k, s in EVA_DETECTOR.items()})
    return state
