"""Each expert on a tiny config against the upstream library module with the same weights (HF CLIP,
timm ConvNeXt, HF SAM, HF Pix2Struct) with Eagle's quirks applied; EVA's pieces against their
formulas."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from eagle_fast.model.presets import TINY_EXPERTS
from eagle_fast.ops import fused_preprocess
from eagle_fast.vision.experts import build_expert
from eagle_fast.vision.experts.eva import (
    EvaBlock,
    EvaConfig,
    rope_2d,
    rotate_pairs,
    window_partition,
    window_unpartition,
)

TINY = TINY_EXPERTS  # every expert of the eagle-tiny presets


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _canvas(size, b=2, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_drops_cls_before_pre_layernorm_and_skips_post_layernorm():
    from transformers import CLIPVisionModel

    expert = _randomize(build_expert("clip-448", TINY["clip-448"])).eval()
    assert expert.grid == 4 and expert.input_key == "clip" and expert.hidden_size == 32
    keys = set(expert.state_dict())
    assert "vision_tower.vision_model.embeddings.class_embedding" in keys
    assert "vision_tower.vision_model.post_layernorm.weight" in keys  # kept for the checkpoint, unused
    hf = CLIPVisionModel(expert.cfg.hf())
    hf.load_state_dict(expert.vision_tower.vision_model.state_dict())
    hf.set_attn_implementation("sdpa")
    x = _canvas(56)
    h = hf.pre_layrnorm(hf.embeddings(x)[:, 1:])  # Eagle: CLS dropped before the pre-LN
    for layer in hf.encoder.layers:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    got = expert(x)
    assert got.shape == (2, 32, 4, 4)  # the 4 x 4 token grid as a map
    got = got.flatten(2).transpose(1, 2)
    assert (got - h).abs().max() < 1e-5
    standard = hf(x).last_hidden_state[:, 1:]  # the usual LLaVA path differs
    assert (got - standard).abs().max() > 1e-3


def test_convnext_matches_timm_with_layer_scale_named_weight():
    from timm.models.convnext import ConvNeXt as TimmConvNeXt

    cfg = TINY["convnext-1024"]
    expert = _randomize(build_expert("convnext-1024", cfg)).eval()
    sd = expert.vision_tower.state_dict()
    assert "stages.0.blocks.0.weight" in sd and not any(k.endswith("gamma") for k in sd)
    assert {"head.norm.weight", "head.fc.weight"} <= set(sd)
    timm_model = TimmConvNeXt(
        depths=cfg["depths"], dims=cfg["dims"], num_classes=cfg["num_classes"], norm_eps=expert.cfg.eps
    ).eval()
    renamed = {
        (
            k[: -len("weight")] + "gamma"
            if k.count(".") == 4 and k.endswith("weight") and ".blocks." in k and k.split(".")[-2].isdigit()
            else k
        ): v
        for k, v in sd.items()
    }
    missing, unexpected = timm_model.load_state_dict(renamed, strict=False)
    assert not unexpected and not missing
    x = _canvas(64)
    got = expert(x)
    assert got.shape == (2, 32, 2, 2) and expert.grid == 2
    assert (got - timm_model.forward_features(x)).abs().max() < 1e-5


def test_sam_replaced_neck_and_hf_trunk():
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    expert = _randomize(build_expert("sam-1024", TINY["sam-1024"])).eval()
    sd = expert.state_dict()
    neck = {k for k in sd if ".neck." in k}
    assert neck == {
        "vision_tower.neck.conv1.weight",
        "vision_tower.neck.layer_norm1.weight",
        "vision_tower.neck.layer_norm1.bias",
    }
    assert expert.spec.unshuffle == 2 and expert.hidden_size == 32 and expert.grid == 2
    hf = SamVisionEncoder(expert.cfg.hf()).eval()
    missing, unexpected = hf.load_state_dict(expert.vision_tower.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"neck.conv2.weight", "neck.layer_norm2.weight", "neck.layer_norm2.bias"}
    x = _canvas(64)
    h = hf.patch_embed(x) + hf.pos_embed
    for layer in hf.layers:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    conv = F.conv2d(h.permute(0, 3, 1, 2), expert.vision_tower.neck.conv1.weight)
    ln = expert.vision_tower.neck.layer_norm1
    want = F.layer_norm(conv.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    got = expert(x)
    assert got.shape == (2, 8, 4, 4)
    assert (got - want).abs().max() < 1e-5


def test_pix2struct_first_grid_tokens_as_map():
    from transformers import Pix2StructVisionModel

    expert = _randomize(build_expert("pix2struct-1024", TINY["pix2struct-1024"])).eval()
    assert expert.grid == 4 and expert.input_key == "pix2struct"
    images = [
        torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    pre = fused_preprocess(images, canvas_size=64, clip_size=0, pix2struct_max_patches=16)
    hf = Pix2StructVisionModel(expert.cfg.hf()).eval()
    hf.load_state_dict(expert.vision_tower.state_dict())
    hf.set_attn_implementation("sdpa")
    want = hf(flattened_patches=pre.flattened_patches, attention_mask=pre.attention_mask).last_hidden_state
    got = expert(pre.flattened_patches, pre.attention_mask)
    assert got.shape == (2, 32, 4, 4)
    assert (got - want[:, :16].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)).abs().max() < 1e-5


def test_official_expert_sizes_on_meta_device():
    """Full-size experts build from their configs alone (no weights looked for) with Eagle's dims."""
    want = {
        "clip-448": (1024, 24, 1),
        "convnext-1024": (3072, 32, 1),
        "sam-1024": (1024, 32, 2),
        "det-1024": (1024, 64, 1),
        "pix2struct-1024": (1536, 45, 1),
    }
    with torch.device("meta"):
        for name, (hidden, grid, unshuffle) in want.items():
            e = build_expert(name)
            assert (e.hidden_size, e.grid, e.spec.unshuffle) == (hidden, grid, unshuffle), name
    with pytest.raises(ValueError, match="unknown vision expert"):
        build_expert("siglip-384")
    with pytest.raises(ValueError, match="bad config"):
        build_expert("det-1024", {"no_such_field": 1})


# ----------------------------------------------------------------------------- EVA pieces


def test_eva_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 7, 5)
    win, padded = window_partition(x, 4)
    assert win.shape == (2 * 3 * 2, 16, 5) and padded == (12, 8)
    assert torch.equal(window_unpartition(win, 4, padded, (10, 7)), x)
    assert torch.equal(win[0].view(4, 4, 5), x[0, :4, :4])  # window 0 is the top-left block


def test_eva_rope_tables_match_formula():
    head_dim, n, pt = 16, 4, 16
    cos, sin = rope_2d(head_dim, n, pt)
    half = head_dim // 2
    for r in range(n):
        for c in range(n):
            for ch in range(head_dim):
                axis_pos = r if ch < half else c
                i = (ch % half) // 2  # pairs share a frequency
                angle = (axis_pos / n * pt) * (1.0 / 10000 ** (2 * i / half))
                assert math.isclose(cos[r * n + c, ch].item(), math.cos(angle), abs_tol=1e-6)
                assert math.isclose(sin[r * n + c, ch].item(), math.sin(angle), abs_tol=1e-6)
    x = torch.randn(3, 8)
    assert torch.equal(
        rotate_pairs(x).view(3, 4, 2), torch.stack([-x.view(3, 4, 2)[..., 1], x.view(3, 4, 2)[..., 0]], -1)
    )


def test_eva_pos_embed_resampling_is_bicubic_interpolate():
    expert = _randomize(build_expert("det-1024", TINY["det-1024"]))
    vt = expert.vision_tower
    assert vt.pos_embed.shape == (1, 10, 32)
    got = vt.resized_pos_embed(8, 8)
    table = vt.pos_embed[:, 1:].reshape(1, 3, 3, 32).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(got, want)


def test_eva_global_block_equals_one_full_window():
    cfg = EvaConfig(**TINY["det-1024"])
    glb = _randomize(EvaBlock(cfg, window=0))
    win = copy.deepcopy(glb)
    win.window = cfg.grid  # one window covering the whole grid
    cos, sin = rope_2d(16, cfg.grid, cfg.rope_pt_seq)
    x = torch.randn(2, cfg.grid, cfg.grid, 32)
    assert torch.allclose(glb(x, cos, sin), win(x, cos, sin), atol=1e-5)


def test_eva_expert_forward_backward_and_keys():
    expert = _randomize(build_expert("det-1024", TINY["det-1024"]))
    keys = set(expert.state_dict())
    for k in (
        "vision_tower.patch_embed.proj.bias",
        "vision_tower.pos_embed",
        "vision_tower.blocks.0.attn.q_bias",
        "vision_tower.blocks.0.attn.v_bias",
        "vision_tower.blocks.2.mlp.ffn_ln.weight",
        "vision_tower.blocks.1.mlp.w3.weight",
    ):
        assert k in keys, k
    assert not any("rope" in k or "k_bias" in k for k in keys)
    out = expert(_canvas(64))
    assert out.shape == (2, 32, 8, 8)
    out.square().mean().backward()
    assert expert.vision_tower.pos_embed.grad.abs().sum() > 0
