"""EagleImageProcessor: mixture-driven outputs, input kinds, errors, persistence."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eagle_fast import EagleImageProcessor
from eagle_fast.ops import fused_preprocess

X5 = "clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"
X4 = "clip-448;convnext-1024;det-1024;pix2struct-1024"


def test_x5_outputs_and_parity_with_the_op(real_photos):
    proc = EagleImageProcessor(X5)
    photo = real_photos["china"]
    out = proc(Image.fromarray(photo))
    assert out["pixel_values"].shape == (1, 3, 1024, 1024)
    assert set(out["expert_inputs"]) == {"clip-448", "pix2struct-1024"}
    assert out["expert_inputs"]["clip-448"].shape == (1, 3, 336, 336)
    p2s = out["expert_inputs"]["pix2struct-1024"]
    assert p2s["flattened_patches"].shape == (1, 2048, 770) and p2s["attention_mask"].shape == (1, 2048)
    ref = fused_preprocess([torch.from_numpy(photo)], backend="reference")
    assert torch.equal(out["pixel_values"], ref.pixel_values)


@pytest.mark.parametrize(
    "towers,expected",
    [
        (X4, {"clip-448", "pix2struct-1024"}),
        ("convnext-1024;sam-1024", set()),  # no ConvNeXt-less crash, no needless outputs
        ("pix2struct-1024;clip-448", {"clip-448", "pix2struct-1024"}),
        ("det-1024", set()),
    ],
)
def test_mixture_decides_expert_inputs(towers, expected):
    out = EagleImageProcessor(towers, image_size=64, pix2struct_max_patches=16)(np.zeros((10, 20, 3), np.uint8))
    assert set(out["expert_inputs"]) == expected
    assert out["pixel_values"].shape == (1, 3, 64, 64)


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown expert"):
        EagleImageProcessor("clip-448;resnet-50")
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        EagleImageProcessor(X5, image_aspect_ratio="anyres")
    with pytest.raises(ValueError, match="dtype"):
        EagleImageProcessor(X5, dtype=torch.float16)
    with pytest.raises(ValueError, match="twice"):
        EagleImageProcessor("clip-448;clip-448")


def test_input_kinds_agree_with_pil_convert_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (31, 47, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (31, 47, 1), dtype=np.uint8)], -1)
    gray = rgb[..., 0]
    proc = EagleImageProcessor("convnext-1024", image_size=48)

    def canvas(x):
        return proc(x)["pixel_values"]

    want_rgb = canvas(Image.fromarray(rgb))
    assert torch.equal(canvas(rgb), want_rgb)  # numpy HWC
    assert torch.equal(canvas(np.ascontiguousarray(rgb.transpose(2, 0, 1))), want_rgb)  # numpy CHW
    assert torch.equal(canvas(torch.from_numpy(rgb).permute(2, 0, 1)), want_rgb)  # torch CHW
    assert torch.equal(canvas(torch.from_numpy(rgb)), want_rgb)  # torch HWC (last axis is 3)
    assert torch.equal(canvas(rgba), canvas(Image.fromarray(rgba, "RGBA")))  # alpha dropped like PIL
    assert torch.equal(canvas(Image.fromarray(rgba, "RGBA")), want_rgb)
    assert torch.equal(canvas(gray), canvas(Image.fromarray(gray, "L")))  # replicated like PIL
    pal = Image.fromarray(rgb).convert("P")
    assert torch.equal(canvas(pal), canvas(pal.convert("RGB")))


def test_single_image_and_list_batches():
    proc = EagleImageProcessor(X5, image_size=64, pix2struct_max_patches=16, pix2struct_patch=8, clip_size=24)
    a, b = np.full((5, 9, 3), 7, np.uint8), np.full((20, 4, 3), 200, np.uint8)
    one = proc(a)
    both = proc([a, b])
    assert both["pixel_values"].shape[0] == 2
    assert torch.equal(both["pixel_values"][0], one["pixel_values"][0])


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((0, 4, 3), np.uint8), "image 1: empty"),
        (np.zeros((4, 4, 3), np.float32), "image 1: dtype float32"),
        (np.zeros((5, 4, 6), np.uint8), "image 1: shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "image 1: 4-D"),
        (np.zeros((300, 300, 3), np.uint8), "image 1: 300x300 = 90000 pixels exceeds max_pixels"),
        (Image.new("RGB", (300, 300)), "image 1: 300x300"),
        (b"bytes", "image 1: unsupported type"),
    ],
)
def test_bad_images_are_named(bad, match):
    proc = EagleImageProcessor("convnext-1024", image_size=32, max_pixels=50_000)
    with pytest.raises(ValueError, match=match):
        proc([np.zeros((4, 4, 3), np.uint8), bad])


def test_bf16_output():
    proc = EagleImageProcessor(X5, image_size=64, pix2struct_max_patches=16, pix2struct_patch=8, dtype="bfloat16")
    out = proc(np.zeros((10, 10, 3), np.uint8))
    assert out["pixel_values"].dtype == torch.bfloat16
    assert out["expert_inputs"]["clip-448"].dtype == torch.bfloat16
    assert out["expert_inputs"]["pix2struct-1024"]["flattened_patches"].dtype == torch.bfloat16


def test_save_and_load_round_trip(tmp_path):
    proc = EagleImageProcessor(X4, image_aspect_ratio="square", image_size=512, dtype=torch.bfloat16, max_pixels=10**6)
    path = proc.save_pretrained(tmp_path)
    data = json.loads(open(path).read())
    assert data["vision_towers"] == X4 and data["dtype"] == "bfloat16"
    for source in (tmp_path, path):
        again = EagleImageProcessor.from_pretrained(source)
        assert again.config == proc.config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**data, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        EagleImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        EagleImageProcessor.from_pretrained(tmp_path / "missing")
