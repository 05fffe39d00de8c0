"""fused_preprocess: the reference against Pillow / HF processors on real photos, and every kernel
(C++ CPU, Triton under the interpreter, CUDA and compiled Triton on a GPU) against the reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eagle_fast.ops import fused_preprocess
from eagle_fast.ops.fused_preprocess import CLIP_MEAN, CLIP_STD, PAD_FILL, reference_canvas

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _expand2square(im: Image.Image) -> Image.Image:  # Eagle's pad: PIL paste on a fill square
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), PAD_FILL)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def _hf_clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 1024}, crop_size={"height": 1024, "width": 1024})


def _assert_canvas_matches(ours: np.ndarray, theirs: np.ndarray):
    """The acceptance bar: >= 99% of canvas values identical to Pillow's, none more than 1 LSB off."""
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert (diff == 0).mean() >= 0.99, f"only {(diff == 0).mean():.4%} identical"
    assert diff.max() <= 1


def _rand_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------- reference vs HF


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("name", ["china", "flower", "grace_hopper"])
def test_reference_matches_pillow_and_hf_clip(real_photos, name, pad):
    img = real_photos[name]
    pil = Image.fromarray(img)
    src = _expand2square(pil) if pad else pil
    hf = _hf_clip_processor()(src, return_tensors="pt")["pixel_values"][0]  # (3, 1024, 1024)
    out = fused_preprocess([torch.from_numpy(img)], pad=pad, backend="reference")
    # Canvas vs Pillow itself (pad mode: a square, so the processor's resize is one PIL call).
    canvas = reference_canvas(torch.from_numpy(img), 1024, pad, PAD_FILL).numpy()
    if pad:
        _assert_canvas_matches(canvas, np.array(src.resize((1024, 1024), Image.BICUBIC)))
    # Normalized values vs the HF processor: identical canvases give identical floats.
    diff = (out.pixel_values[0] - hf).abs()
    assert (diff == 0).float().mean() >= 0.99
    assert diff.max() <= 1.0 / 255 / min(CLIP_STD) + 1e-6
    # CLIP: bilinear align_corners=True of pixel_values.
    clip = F.interpolate(hf[None], size=(336, 336), mode="bilinear", align_corners=True)[0]
    assert (out.clip[0] - clip).abs().max() <= 1e-5 + diff.max()


@pytest.mark.parametrize("name", ["china", "grace_hopper"])
def test_reference_matches_hf_pix2struct(real_photos, name):
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil

    out = fused_preprocess([torch.from_numpy(real_photos[name])], backend="reference")
    denorm = (out.pixel_values[0] * STD + MEAN) * 255  # what Eagle feeds the Pix2Struct processor
    hf = Pix2StructImageProcessorPil()(denorm, return_tensors="pt", input_data_format="channels_first")
    assert out.flattened_patches.shape == (1, 2048, 770)
    assert (out.flattened_patches[0] - hf["flattened_patches"][0]).abs().max() <= 1e-4
    assert torch.equal(out.attention_mask[0], hf["attention_mask"][0])
    assert out.attention_mask[0].sum() == 45 * 45  # 720x720 in 16-px patches


def test_reference_odd_sizes_match_pillow():
    for h, w in [(1, 1), (3, 1000), (1000, 3), (1024, 1024), (1100, 900)]:
        img = _rand_image(h, w, seed=h + w)
        sq = _expand2square(Image.fromarray(img.numpy()))
        want = np.array(sq.resize((1024, 1024), Image.BICUBIC)) if sq.size != (1024, 1024) else np.array(sq)
        got = reference_canvas(img, 1024, True, PAD_FILL).numpy()
        _assert_canvas_matches(got, want)


def test_square_mode_crops_the_shortest_edge_resize():
    img = _rand_image(300, 500, seed=3)
    pil = Image.fromarray(img.numpy()).resize((int(1024 * 500 / 300), 1024), Image.BICUBIC)  # (w, h)
    left = (pil.size[0] - 1024) // 2
    want = np.array(pil)[:, left : left + 1024]
    _assert_canvas_matches(reference_canvas(img, 1024, False, PAD_FILL).numpy(), want)


# ----------------------------------------------------------------------------- kernels vs reference


def _max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _compare(got, want, dtype):
    """Canvas-derived pixel_values exact; clip 1e-5; patches 1e-4 (fp32) / 1 bf16 ulp."""
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got.pixel_values, want.pixel_values)
        assert _max_abs(got.clip, want.clip) <= 1e-5
        assert _max_abs(got.flattened_patches, want.flattened_patches) <= 1e-4
    else:  # both round the same fp32 maths to bf16; a value on a rounding edge may differ by 1 ulp
        for g, w in zip(got[:3], want[:3]):
            tol = w.float().abs() * 2**-7 + 1e-6
            assert ((g.float() - w.float()).abs() <= tol).all()
        assert torch.equal(got.pixel_values, want.pixel_values)
    assert torch.equal(got.attention_mask, want.attention_mask)


ODD_BATCH = [(1, 1), (3, 1000), (1000, 3), (427, 640), (1100, 1100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [True, False])
def test_cpu_kernel_matches_reference_full_size(pad, dtype):
    images = [_rand_image(h, w, seed=i) for i, (h, w) in enumerate(ODD_BATCH)]
    got = fused_preprocess(images, pad=pad, dtype=dtype)
    want = fused_preprocess(images, pad=pad, dtype=dtype, backend="reference")
    _compare(got, want, dtype)


def test_cpu_kernel_on_real_photos_mixed_batch(real_photos):
    images = [torch.from_numpy(a) for a in real_photos.values()]
    got = fused_preprocess(images)
    want = fused_preprocess(images, backend="reference")
    _compare(got, want, torch.float32)
    for i, im in enumerate(images):  # batching changes nothing
        single = fused_preprocess([im])
        assert torch.equal(single.pixel_values[0], got.pixel_values[i])
        assert torch.equal(single.flattened_patches[0], got.flattened_patches[i])


@pytest.mark.parametrize(
    "canvas,clip,patches,patch", [(64, 24, 16, 8), (33, 7, 10, 4), (48, 0, 0, 16), (40, 40, 9, 3), (100, 12, 9, 32)]
)
def test_cpu_kernel_small_canvases_and_skips(canvas, clip, patches, patch):
    images = [_rand_image(h, w, seed=h) for h, w in [(7, 5), (13, 29), (1, 1), (40, 40), (100, 70)]]
    for pad in (True, False):
        kw = dict(canvas_size=canvas, pad=pad, clip_size=clip, pix2struct_max_patches=patches, pix2struct_patch=patch)
        got = fused_preprocess(images, **kw)
        want = fused_preprocess(images, **kw, backend="reference")
        _compare(got, want, torch.float32)
        if clip == 0:
            assert got.clip.numel() == 0
        if patches == 0:
            assert got.flattened_patches.numel() == 0 and got.attention_mask.numel() == 0


def test_non_contiguous_input_is_accepted():
    base = _rand_image(60, 90, seed=5)
    view = base.permute(1, 0, 2)  # (90, 60, 3), non-contiguous
    assert not view.is_contiguous()
    got = fused_preprocess([view], canvas_size=64, clip_size=24, pix2struct_max_patches=16, pix2struct_patch=8)
    want = fused_preprocess(
        [view.contiguous()],
        canvas_size=64,
        clip_size=24,
        pix2struct_max_patches=16,
        pix2struct_patch=8,
        backend="reference",
    )
    _compare(got, want, torch.float32)


def test_fake_kernel_and_opcheck():
    images = [_rand_image(9, 14), _rand_image(20, 3, seed=1)]
    args = (images, 32, True, list(PAD_FILL), list(CLIP_MEAN), list(CLIP_STD), 12, 8, 4, torch.float32)
    torch.library.opcheck(
        torch.ops.eagle_fast.fused_preprocess.default, args, test_utils=("test_schema", "test_faketensor")
    )
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(im) for im in images]
        out = torch.ops.eagle_fast.fused_preprocess(fake, *args[1:])
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 32), (2, 3, 12, 12), (2, 8, 50), (2, 8)]


@pytest.mark.parametrize("clip,patches", [(12, 8), (0, 0), (12, 0), (0, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_are_fresh_contiguous_tensors_as_the_fake_kernel_says(clip, patches, dtype):
    """Every output, a skipped (0,) one included, is its own contiguous tensor sharing memory with
    no input and no other output, and the fake kernel predicts its metadata (shape, strides, dtype)."""
    images = [_rand_image(9, 14), _rand_image(20, 3, seed=1), _rand_image(16, 16, seed=2)]
    args = (images, 16, True, list(PAD_FILL), list(CLIP_MEAN), list(CLIP_STD), clip, patches, 4, dtype)
    torch.library.opcheck(
        torch.ops.eagle_fast.fused_preprocess.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    out = torch.ops.eagle_fast.fused_preprocess(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.eagle_fast.fused_preprocess([mode.from_tensor(im) for im in images], *args[1:])
    for o, f in zip(out, fake):
        assert o.is_contiguous() and o.dtype == dtype
        assert (o.shape, o.stride()) == (f.shape, f.stride())
    storages = [t.untyped_storage() for t in (*out, *images) if t.numel()]
    assert len({st.data_ptr() for st in storages}) == len(storages)
    assert len({id(o) for o in out}) == 4
    pv, c, p, m = out
    assert pv.shape == (3, 3, 16, 16)
    assert c.shape == ((3, 3, clip, clip) if clip else (0,))
    assert (p.shape, m.shape) == (((3, patches, 2 + 4 * 4 * 3), (3, patches)) if patches else ((0,), (0,)))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(0, 5, 3, dtype=torch.uint8), "image 1: empty"),
        (torch.zeros(5, 5, 3, dtype=torch.float32), "image 1: dtype"),
        (torch.zeros(5, 5, 4, dtype=torch.uint8), r"image 1: shape \(5, 5, 4\)"),
        ("not an image", "image 1: expected a torch.Tensor"),
    ],
)
def test_bad_input_names_the_image(bad, match):
    with pytest.raises(ValueError, match=match):
        fused_preprocess([_rand_image(4, 4), bad])


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        fused_preprocess([_rand_image(4, 4)], dtype=torch.float16)
    with pytest.raises(ValueError, match="backend"):
        fused_preprocess([_rand_image(4, 4)], backend="nope")
    with pytest.raises(ValueError, match="no images"):
        fused_preprocess([])


# ----------------------------------------------------------------------------- Triton


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference(dtype):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)
    images = [_rand_image(h, w, seed=h).to(device) for h, w in [(7, 5), (13, 29), (1, 1), (40, 40), (50, 9)]]
    for pad in (True, False):
        kw = dict(canvas_size=32, pad=pad, clip_size=12, pix2struct_max_patches=16, pix2struct_patch=4, dtype=dtype)
        got = fused_preprocess(images, **kw, backend="triton")
        want = fused_preprocess(images, **kw, backend="reference")
        _compare(got, want, dtype)


# ----------------------------------------------------------------------------- GPU (lent device only)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_reference_full_size(real_photos, backend, dtype):
    images = [_rand_image(h, w, seed=i) for i, (h, w) in enumerate(ODD_BATCH)]
    images += [torch.from_numpy(a) for a in real_photos.values()]
    for pad in (True, False):
        want = fused_preprocess(images, pad=pad, dtype=dtype, backend="reference")
        got = fused_preprocess([im.cuda() for im in images], pad=pad, dtype=dtype, backend=backend)
        _compare(type(got)(*(t.cpu() for t in got)), want, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("clip,patches", [(0, 0), (12, 0)])
def test_triton_op_kernel_gives_every_skipped_output_its_own_tensor(clip, patches):
    """The op's CUDA kernel when Triton stands in for the CUDA C++ ones: every skipped output is its
    own (0,) tensor (the op's no-aliasing contract; a shared one fails the op's check)."""
    pytest.importorskip("triton")
    from eagle_fast.triton_kernels.preprocess.fused_preprocess import fused_preprocess_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)
    images = [_rand_image(h, w, seed=h).to(device) for h, w in [(7, 5), (13, 29)]]
    args = (images, 16, True, list(PAD_FILL), list(CLIP_MEAN), list(CLIP_STD), clip, patches, 4, torch.float32)
    got = fused_preprocess_triton(*args)
    assert len({id(o) for o in got}) == 4
    assert [tuple(o.shape) for o in got[1 + (clip > 0) :]] == [(0,)] * (3 - (clip > 0))
    want = fused_preprocess(
        images, canvas_size=16, clip_size=clip, pix2struct_max_patches=patches, pix2struct_patch=4, backend="reference"
    )
    _compare(type(want)(*(t.cpu() for t in got)), want, torch.float32)
