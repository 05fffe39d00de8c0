"""resize_concat: every kernel (C++ CPU, Triton under the interpreter, CUDA and compiled Triton on a
GPU) against the reference (the original F.interpolate + cat), forward and gradients."""

import pytest
import torch

from eagle_fast.ops import resize_concat
from eagle_fast.ops.resize_concat import _resize_concat_backward_reference, _resize_concat_reference


def _features(shapes, dtype=torch.float32, seed=0, device="cpu", layout="contiguous"):
    """shapes: ("map", C, side) -> (B, C, side, side); ("tok", C, side) -> (B, side*side, C)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind, c, side, b in shapes:
        if kind == "tok":
            x = torch.randn(b, side * side, c, generator=g)
        else:
            x = torch.randn(b, c, side, side, generator=g)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            elif layout == "sliced":  # non-contiguous: every other channel of a wider map
                x = torch.randn(b, 2 * c, side, side, generator=g)[:, ::2]
        out.append(x.to(device=device, dtype=dtype))
    return out


def _as_maps(features):
    from eagle_fast.ops.resize_concat import _as_map

    return [_as_map(f, i) for i, f in enumerate(features)]


# Eagle's shape sets scaled down (channels / 64, sides as in the real models where cheap).
X5 = [("tok", 16, 24, 2), ("map", 48, 32, 2), ("map", 4, 64, 2), ("map", 16, 64, 2), ("map", 24, 45, 2)]
X5_UNSHUFFLE = [1, 1, 2, 1, 1]
X4 = [("tok", 16, 24, 2), ("map", 48, 32, 2), ("map", 16, 64, 2), ("map", 24, 45, 2)]
CASES = {
    "x5": (X5, 32, X5_UNSHUFFLE),
    "x4": (X4, 32, None),
    "odd": ([("map", 3, 1, 3), ("map", 5, 7, 3), ("tok", 2, 7, 3)], 5, None),
    "single_up": ([("map", 6, 24, 1)], 32, None),
    "single_down_unshuffle": ([("map", 3, 12, 1)], 4, [2]),
    "identity": ([("map", 4, 8, 3), ("map", 2, 16, 3)], 8, [1, 2]),
}


def _check(features, grid, unshuffle, got, atol=1e-5):
    want = _resize_concat_reference(_as_maps(features), grid, unshuffle or [1] * len(features))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= atol


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cpu_forward_and_backward_match_reference(case, layout):
    shapes, grid, unshuffle = CASES[case]
    feats = [f.requires_grad_(True) for f in _features(shapes, layout=layout)]
    out = resize_concat(feats, grid, unshuffle)
    _check(feats, grid, unshuffle, out)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, feats, grad)
    ref_feats = [f.detach().clone().requires_grad_(True) for f in feats]
    ref = torch.autograd.grad(resize_concat(ref_feats, grid, unshuffle, backend="reference"), ref_feats, grad)
    for g, r, f in zip(got, ref, feats):
        assert g.shape == f.shape
        assert (g - r).abs().max() <= 1e-5


def test_gradcheck_float64():
    shapes = [("map", 2, 5, 2), ("tok", 3, 3, 2), ("map", 1, 8, 2)]
    feats = [f.requires_grad_(True) for f in _features(shapes, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *xs: resize_concat(list(xs), 4, [1, 1, 2]), feats)


@pytest.mark.parametrize("case", ["x5", "odd"])
def test_bf16_within_twice_torch_error(case):
    shapes, grid, unshuffle = CASES[case]
    feats32 = [f.requires_grad_(True) for f in _features(shapes, seed=3)]
    feats16 = [f.detach().bfloat16().requires_grad_(True) for f in feats32]
    ref32 = resize_concat(feats32, grid, unshuffle, backend="reference")
    grad = torch.randn_like(ref32)
    torch16 = resize_concat(feats16, grid, unshuffle, backend="reference")  # PyTorch's own bf16 path
    ours16 = resize_concat(feats16, grid, unshuffle)
    err_torch = (torch16.float() - ref32).abs().max()
    assert (ours16.float() - ref32).abs().max() <= 2 * err_torch + 1e-6
    g32 = torch.autograd.grad(ref32, feats32, grad)
    g_torch = torch.autograd.grad(torch16, feats16, grad.bfloat16())
    g_ours = torch.autograd.grad(ours16, feats16, grad.bfloat16())
    for a, t, o in zip(g32, g_torch, g_ours):
        assert (o.float() - a).abs().max() <= 2 * (t.float() - a).abs().max() + 1e-6


def test_backward_is_deterministic_across_thread_counts():
    shapes, grid, unshuffle = CASES["x5"]
    feats = _features(shapes, seed=7)
    grad = torch.randn(
        2, grid * grid, sum(f.shape[-1] if f.dim() == 3 else f.shape[1] * u * u for f, u in zip(feats, unshuffle))
    )
    maps = _as_maps(feats)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            runs.append(torch.ops.eagle_fast.resize_concat_backward(grad, maps, grid, unshuffle))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_opcheck_and_torch_compile():
    shapes = [("map", 3, 6, 2), ("tok", 2, 4, 2), ("map", 1, 8, 2)]
    maps = [m.requires_grad_(True) for m in _as_maps(_features(shapes))]
    torch.library.opcheck(torch.ops.eagle_fast.resize_concat.default, (maps, 4, [1, 1, 2]))

    def fusion(a, b, c):
        return resize_concat([a, b, c], 4, [1, 1, 2]) * 2

    compiled = torch.compile(fusion, fullgraph=True, backend="aot_eager")
    feats = [f.requires_grad_(True) for f in _features(shapes, seed=1)]
    out = compiled(*feats)
    assert torch.allclose(out, fusion(*feats))
    out.sum().backward()
    assert all(f.grad is not None for f in feats)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("case", ["x5", "odd", "identity", "single_down_unshuffle"])
def test_backward_reference_equals_autograd_of_the_reference(case, layout, dtype):
    """The backward op's pure-torch body (also every backward kernel's oracle) is the VJP that
    autograd computes through the forward reference, for every layout and dtype."""
    shapes, grid, unshuffle = CASES[case]
    unshuffle = unshuffle or [1] * len(shapes)
    maps = [m.requires_grad_(True) for m in _as_maps(_features(shapes, dtype=dtype, seed=4, layout=layout))]
    out = _resize_concat_reference(maps, grid, unshuffle)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = torch.autograd.grad(out, maps, grad)
    got = _resize_concat_backward_reference(grad, [m.detach() for m in maps], grid, unshuffle)
    for g, w, m in zip(got, want, maps):
        assert g.dtype == dtype and g.shape == m.shape and g.stride() == torch.empty_like(m).stride()
        assert torch.equal(g, w)  # the same backward ops in the same order: bit for bit


def test_backward_op_opcheck():
    """The registered backward op (C++ kernel, or the pure-torch body without it): schema, fake
    kernel strides (empty_like of each feature: channels-last, token-grid view, sliced) and outputs."""
    shapes = [("map", 3, 6, 2), ("tok", 2, 4, 2), ("map", 1, 8, 2)]
    maps = _as_maps(_features(shapes))
    maps[0] = maps[0].to(memory_format=torch.channels_last)
    maps[2] = torch.randn(2, 2, 8, 8)[:, ::2]  # (2, 1, 8, 8), not dense
    grad = torch.randn(2, 16, 3 + 2 + 4)
    torch.library.opcheck(torch.ops.eagle_fast.resize_concat_backward.default, (grad, maps, 4, [1, 1, 2]))
    got = torch.ops.eagle_fast.resize_concat_backward(grad, maps, 4, [1, 1, 2])
    for g, w, m in zip(got, _resize_concat_backward_reference(grad, maps, 4, [1, 1, 2]), maps):
        assert g.stride() == torch.empty_like(m).stride()
        assert (g - w).abs().max() <= 1e-5
        assert g.data_ptr() != grad.data_ptr()


@pytest.mark.parametrize(
    "feats,unshuffle,match",
    [
        ([torch.zeros(1, 2, 4, 5)], None, "feature 0: map .* is not square"),
        ([torch.zeros(1, 4, 4, 4), torch.zeros(1, 7, 3)], None, "feature 1: token grid of 7 tokens"),
        ([torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.float64)], None, "feature 1: torch.float64"),
        ([torch.zeros(1, 4, 4, 4), torch.zeros(2, 4, 4, 4)], None, "feature 1: batch 2"),
        ([torch.zeros(1, 4, 6, 6)], [4], "feature 0: unshuffle 4"),
        ([torch.zeros(4, 4)], None, "feature 0: 2-D"),
    ],
)
def test_bad_input_is_named(feats, unshuffle, match):
    with pytest.raises(ValueError, match=match):
        resize_concat(feats, 4, unshuffle)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_matches_reference(dtype):
    pytest.importorskip("triton")
    from eagle_fast.triton_kernels.vision.resize_concat import resize_concat_backward_triton, resize_concat_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)
    shapes = [("map", 3, 1, 2), ("map", 5, 7, 2), ("tok", 4, 3, 2), ("map", 2, 8, 2)]
    maps = _as_maps(_features(shapes, dtype=dtype, device=device, seed=2))
    unshuffle = [1, 1, 1, 2]
    ref = _resize_concat_reference([m.double() for m in maps], 4, unshuffle)
    got = resize_concat_triton(maps, 4, unshuffle)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == dtype and (got.double() - ref).abs().max() <= tol
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    want = _resize_concat_backward_reference(grad, [m.double() for m in maps], 4, unshuffle)
    for g, w, m in zip(resize_concat_backward_triton(grad.to(dtype), maps, 4, unshuffle), want, maps):
        assert g.shape == m.shape and g.stride() == torch.empty_like(m).stride()
        assert (g.double() - w).abs().max() <= tol * 4


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_reference(backend, dtype):
    for case in ("x5", "odd", "identity"):
        shapes, grid, unshuffle = CASES[case]
        feats = [f.requires_grad_(True) for f in _features(shapes, dtype=dtype, device="cuda", seed=5)]
        out = resize_concat(feats, grid, unshuffle, backend=backend)
        ref = resize_concat(feats, grid, unshuffle, backend="reference")
        tol = (
            1e-5
            if dtype == torch.float32
            else 2
            * (ref.float() - resize_concat([f.float() for f in feats], grid, unshuffle, backend="reference"))
            .abs()
            .max()
            .item()
            + 1e-6
        )
        assert (out.float() - ref.float()).abs().max() <= max(tol, 1e-5)
        grad = torch.randn_like(ref)
        maps = _as_maps(feats)
        if backend == "auto":
            got = torch.ops.eagle_fast.resize_concat_backward(grad, maps, grid, unshuffle or [1] * len(maps))
        else:
            from eagle_fast.triton_kernels.vision.resize_concat import resize_concat_backward_triton

            got = resize_concat_backward_triton(grad, maps, grid, unshuffle or [1] * len(maps))
        want = _resize_concat_backward_reference(
            grad.float(), [m.float() for m in maps], grid, unshuffle or [1] * len(maps)
        )
        for g, w in zip(got, want):
            assert (g.float() - w).abs().max() <= (1e-5 if dtype == torch.float32 else 5e-2)


# ------------------------------------------------------------------ float64: exact, every path
# bilinear align_corners=True as torch defines it: src = g * (n - 1) / (G - 1), i0 = floor(src),
# i1 = min(i0 + 1, n - 1), weights 1 - (src - i0) and src - i0, everything in fp64 here.


def _interp_matrix(n: int, G: int) -> torch.Tensor:
    """(G, n) fp64: row g holds the two bilinear weights of output g on its input samples."""
    m = torch.zeros(G, n, dtype=torch.float64)
    for g in range(G):
        src = g * (n - 1) / (G - 1)
        i0 = int(src)
        lam = src - i0
        m[g, i0] += 1 - lam
        m[g, min(i0 + 1, n - 1)] += lam
    return m


def _fp64_backends(device):
    backends = ["auto", "reference"]
    if device == "cuda" or __import__("os").environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    return backends


def _fp64_backward(backend, grad, maps, grid):
    if backend == "triton":
        from eagle_fast.triton_kernels.vision.resize_concat import resize_concat_backward_triton

        return resize_concat_backward_triton(grad, maps, grid, [1])[0]
    if backend == "reference":
        return _resize_concat_backward_reference(grad, maps, grid, [1])[0]
    return torch.ops.eagle_fast.resize_concat_backward(grad, maps, grid, [1])[0]


def _check_fp64_exact(device):
    # A linear ramp is reproduced exactly by bilinear resampling: 19 x 19 tokens, channel 0 = column,
    # channel 1 = 100 * row, to a 16 x 16 grid: cell (gy, gx) = (1.2 * gx, 120 * gy) (scale 18/15).
    # fp32 coordinates would give 1.2000000477 * gx (5e-8 off at gx = 1).
    i19, i16 = torch.arange(19, dtype=torch.float64), torch.arange(16, dtype=torch.float64)
    row, col = torch.meshgrid(i19, i19, indexing="ij")
    ramp = torch.stack([col, 100 * row], -1).reshape(1, 361, 2).to(device)
    gy, gx = torch.meshgrid(i16, i16, indexing="ij")
    want_ramp = torch.stack([1.2 * gx, 120 * gy], -1).reshape(1, 256, 2)
    # Random tokens (2, 361, 40) -> grid 16: out = M X M^T per channel, grad_in = M^T grad M.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 361, 40, dtype=torch.float64, generator=gen)
    grad = torch.randn(2, 256, 40, dtype=torch.float64, generator=gen)
    m = _interp_matrix(19, 16)
    xm = x.reshape(2, 19, 19, 40)
    want = torch.einsum("yi,bijc,xj->byxc", m, xm, m).reshape(2, 256, 40)
    want_grad = torch.einsum("yi,byxc,xj->bijc", m, grad.reshape(2, 16, 16, 40), m).reshape(2, 361, 40)
    maps = _as_maps([x.to(device)])
    for backend in _fp64_backends(device):
        assert (resize_concat([ramp], 16, backend=backend).cpu() - want_ramp).abs().max() <= 1e-12, backend
        out = resize_concat([x.to(device)], 16, backend=backend)
        assert out.dtype == torch.float64 and (out.cpu() - want).abs().max() <= 1e-12, backend
        got = _fp64_backward(backend, grad.to(device), maps, 16)  # (2, 40, 19, 19) view of the tokens
        assert (got.permute(0, 2, 3, 1).reshape(2, 361, 40).cpu() - want_grad).abs().max() <= 1e-12, backend


def test_float64_is_exact_on_cpu():
    """fp64 inputs: coordinates, weights and sums in fp64 on every CPU path (C++, reference and,
    under TRITON_INTERPRET=1, Triton), forward and backward, within 1e-12 of the exact resampling."""
    _check_fp64_exact("cpu")


@pytest.mark.cuda
def test_float64_is_exact_on_gpu():
    _check_fp64_exact("cuda")
