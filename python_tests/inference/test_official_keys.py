"""Official checkpoints hold the EVA-02 RoPE tables: the original's VisionRotaryEmbeddingFast
registers freqs_cos / freqs_sin as persistent buffers (under vision_tower.rope_win, rope_glb and,
the same modules again, every block's attn.rope) and Eagle's trainer saves them. load_model accepts
them when they equal the tables this model computes, and names the key when they do not."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_fast.inference import load_model

# eagle-tiny-x5: experts clip, convnext, sam, det (EVA-02: index 3), pix2struct. Its EVA: dim 32,
# 2 heads (head_dim 16, so the original's half_head_dim = 8), patch 8 on a 64 canvas (grid 8),
# window 4, block 1 global (window_block_indexes = (0, 2)), pt_hw_seq_len 16.
EVA = "model.vision_tower.vision_towers.3.vision_tower."
HALF_HEAD_DIM, PT_SEQ, WINDOW, GRID, WINDOWED_BLOCKS, DEPTH = 8, 16, 4, 8, (0, 2), 3


def original_rope(dim: int, pt_seq_len: int, ft_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's VisionRotaryEmbeddingFast (freqs_for="lang", theta 10000), written out: fp32
    frequencies 1 / 10000^(2i/dim), positions arange(ft) / ft * pt, each frequency repeated twice
    (interleaved pairs), rows then columns broadcast-concatenated, flattened to (ft*ft, 2*dim)."""
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (ft, dim)
    n = ft_seq_len
    grid = torch.cat([f[:, None, :].expand(n, n, dim), f[None, :, :].expand(n, n, dim)], dim=-1)
    return grid.cos().view(-1, 2 * dim), grid.sin().view(-1, 2 * dim)


def official_rope_keys(dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The 2 + 2 + 2 * DEPTH keys an original EVA-02 of this geometry saves."""
    win, glb = original_rope(HALF_HEAD_DIM, PT_SEQ, WINDOW), original_rope(HALF_HEAD_DIM, PT_SEQ, GRID)
    tables = {"rope_win": win, "rope_glb": glb}
    tables.update({f"blocks.{i}.attn.rope": win if i in WINDOWED_BLOCKS else glb for i in range(DEPTH)})
    return {
        f"{EVA}{name}.freqs_{fn}": pair[j].to(dtype).clone()
        for name, pair in tables.items()
        for j, fn in enumerate(("cos", "sin"))
    }


def test_original_formula_by_hand():
    # dim 8, pt 16, ft 4: positions 0, 4, 8, 12; frequencies 1, 0.1, 0.01, 0.001. Token 4 is
    # (row 1, column 0): the row half holds position 4 times each frequency, twice; the column half 0.
    cos, sin = original_rope(8, 16, 4)
    assert cos.shape == sin.shape == (16, 16)
    c4, c04, c004, c0004 = -0.6536436208636119, 0.9210609940028851, 0.9992001066609779, 0.9999920000106667
    want_cos = [c4, c4, c04, c04, c004, c004, c0004, c0004] + [1.0] * 8
    assert torch.allclose(cos[4], torch.tensor(want_cos), atol=1e-6)
    s4, s04, s004, s0004 = -0.7568024953079282, 0.3894183423086505, 0.03998933418663416, 0.003999989333341867
    assert torch.allclose(
        sin[1], torch.tensor([0.0] * 8 + [s4, s4, s04, s04, s004, s004, s0004, s0004]), atol=1e-6
    )  # token 1: row 0, column 1


@pytest.mark.parametrize("ft", [16, 64])
def test_eva02_l_tables_pass_the_fp32_check(ft):
    # EVA-02-L in Eagle: half_head_dim 32, pt_hw_seq_len 16, 16 x 16 windows and a 64 x 64 grid. The
    # original's fp32 tables stay within the allowance load_model grants fp32 checkpoints.
    from eagle_fast.inference.loading import _ROPE_FP32_SLACK
    from eagle_fast.vision.experts.eva import rope_2d

    for got, want in zip(original_rope(32, 16, ft), rope_2d(64, ft, 16)):
        assert (got.double() - want.double()).abs().max() <= torch.finfo(torch.float32).eps + _ROPE_FP32_SLACK


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, tok, proc = load_model("eagle-tiny-x5")
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model, proc


def _with_keys(src, dst, extra: dict[str, torch.Tensor]):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file({**state, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _features(model, proc):
    img = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    with torch.no_grad():
        return model.encode_images(proc([img]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_official_rope_tables_load(saved, tmp_path, dtype):
    path, model, proc = saved
    extra = official_rope_keys(dtype)
    assert len(extra) == 10 and f"{EVA}blocks.1.attn.rope.freqs_cos" in extra
    loaded, _, _ = load_model(str(_with_keys(path, tmp_path / "official", extra)))
    assert torch.equal(_features(loaded, proc), _features(model, proc))


def test_official_rope_tables_in_a_sharded_checkpoint(saved, tmp_path):
    path, model, proc = saved
    sharded = tmp_path / "sharded"
    shutil.copytree(path, sharded)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="200KB")
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    assert len(set(index["weight_map"].values())) > 1
    extra = official_rope_keys()
    save_file(extra, str(sharded / "model-rope.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(extra, "model-rope.safetensors"))
    index_file.write_text(json.dumps(index))
    loaded, _, _ = load_model(str(sharded))
    assert torch.equal(_features(loaded, proc), _features(model, proc))


def _swap(keys, key, value):
    return {**keys, key: value.clone()}  # safetensors refuses two names for one storage


@pytest.mark.parametrize(
    ("edit", "bad_key", "match"),
    [
        # block 1 is global: the 4x4-window table there is another geometry (16 rows, not 64)
        (
            lambda k: _swap(k, f"{EVA}blocks.1.attn.rope.freqs_cos", k[f"{EVA}rope_win.freqs_cos"]),
            "blocks.1.attn.rope.freqs_cos",
            "has shape",
        ),
        # same shape, other values: sin where cos belongs
        (
            lambda k: _swap(k, f"{EVA}rope_glb.freqs_cos", k[f"{EVA}rope_glb.freqs_sin"]),
            "rope_glb.freqs_cos",
            "differs from the RoPE table",
        ),
        # rope_win without the original's position interpolation (positions 0..3, not 0, 4, 8, 12)
        (
            lambda k: _swap(k, f"{EVA}rope_win.freqs_sin", original_rope(HALF_HEAD_DIM, WINDOW, WINDOW)[1]),
            "rope_win.freqs_sin",
            "differs from the RoPE table",
        ),
        (
            lambda k: _swap(k, f"{EVA}blocks.7.attn.rope.freqs_sin", k[f"{EVA}rope_glb.freqs_sin"]),
            "blocks.7.attn.rope.freqs_sin",
            "block 7 does not exist",
        ),
    ],
)
def test_wrong_rope_table_is_an_error_naming_the_key(saved, tmp_path, edit, bad_key, match):
    path, _, _ = saved
    bad = _with_keys(path, tmp_path / "bad", edit(official_rope_keys()))
    with pytest.raises(ValueError, match=re.escape(EVA + bad_key) + ".*" + match):
        load_model(str(bad))


def test_rope_like_keys_elsewhere_stay_unexpected(saved, tmp_path):
    path, _, _ = saved
    stray = "model.vision_tower.vision_towers.0.vision_tower.rope_win.freqs_cos"  # CLIP has no RoPE
    bad = _with_keys(path, tmp_path / "stray", {**official_rope_keys(), stray: torch.zeros(16, 16)})
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): " + re.escape(stray)):
        load_model(str(bad))
