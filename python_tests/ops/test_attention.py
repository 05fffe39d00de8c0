"""attention: the dispatcher's CPU kernel (PyTorch's CPU flash), the Triton kernels (under the
interpreter here, compiled on a GPU), sdpa, against the fp64 math reference: outputs and gradients,
with flash-attention's rule: error <= 2x PyTorch's own error in the same dtype."""

import math

import pytest
import torch

from eagle_fast.ops import attention, attention_backend
from eagle_fast.ops.attention import _attention_reference

LOW = (torch.float16, torch.bfloat16)


def _qkv(b, sq, sk, h, hk, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda s, n: (b, s, n, d)) if b else (lambda s, n: (s, n, d))
    q = torch.randn(*shape(sq, h), generator=g)
    k = torch.randn(*shape(sk, hk), generator=g)
    v = torch.randn(*shape(sk, hk), generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def _naive_in_dtype(q, k, v, causal, scale, cu_seqlens=None):
    """PyTorch's eager maths in the inputs' dtype (no upcast). With scaled_dot_product_attention in
    the same dtype, the yardstick of the 2x rule (the larger of their two errors)."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        return torch.cat(
            [
                _naive_in_dtype(q[None, a:b], k[None, a:b], v[None, a:b], causal, scale)[0]
                for a, b in zip(cu[:-1], cu[1:])
            ]
        )
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        i, j = torch.arange(sq, device=q.device)[:, None], torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ vt).transpose(1, 2)


def _run(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _assert_two_x_rule(backend, q, k, v, causal, cu_seqlens=None, atol=1e-6):
    scale = 1.0 / math.sqrt(q.shape[-1])
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.device)
    want = _run(
        lambda a, b, c: _attention_reference(a, b, c, causal, scale, cu_seqlens),
        *(x.double() for x in (q, k, v)),
        dout.double(),
    )
    naive = _run(lambda a, b, c: _naive_in_dtype(a, b, c, causal, scale, cu_seqlens), q, k, v, dout.to(q.dtype))
    sdpa = _run(
        lambda a, b, c: attention(a, b, c, causal=causal, cu_seqlens=cu_seqlens, backend="sdpa"),
        q,
        k,
        v,
        dout.to(q.dtype),
    )
    got = _run(
        lambda a, b, c: attention(a, b, c, causal=causal, cu_seqlens=cu_seqlens, backend=backend),
        q,
        k,
        v,
        dout.to(q.dtype),
    )
    for name, g, p1, p2, w in zip(("out", "dq", "dk", "dv"), got, naive, sdpa, want):
        assert g.shape == w.shape and g.dtype == q.dtype, name
        err = (g.double() - w).abs().max().item()
        pt_err = max((p1.double() - w).abs().max().item(), (p2.double() - w).abs().max().item())
        # floor: a few fp32 ulps of the largest value. An fp32 reduction over n rows rounds by about
        # sqrt(n) ulps, and where PyTorch's own error is at that level, the order of summation (the
        # Triton interpreter's numpy on this CPU's BLAS) decides the comparison, not the kernel
        atol = max(atol, 8 * torch.finfo(torch.float32).eps * w.abs().max().item())
        assert err <= 2 * pt_err + atol, f"{backend} {name}: error {err:.3g} > 2 x PyTorch's {pt_err:.3g}"


# (B, Sq, Sk, Hq, Hkv, D, causal): odd lengths, GQA, D in {64, 80, 128}, Sq != Sk both ways
CASES = [
    (2, 67, 67, 4, 2, 64, True),
    (1, 33, 50, 2, 1, 80, False),
    (1, 70, 19, 2, 2, 64, True),
    (1, 20, 45, 4, 1, 128, True),
    (2, 1, 40, 2, 2, 64, True),
]


@pytest.mark.parametrize("backend", ["flash", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_gradients_within_two_x_pytorch_error(backend, dtype, case):
    b, sq, sk, h, hk, d, causal = case
    _assert_two_x_rule(backend, *_qkv(b, sq, sk, h, hk, d, dtype), causal)


@pytest.mark.parametrize("backend", ["flash", "triton", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_uneven_lengths(backend, causal):
    lengths = [1, 17, 64, 3, 0, 30]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = _qkv(0, sum(lengths), sum(lengths), 4, 2, 64, torch.bfloat16, seed=3)
    _assert_two_x_rule(backend, q, k, v, causal, cu_seqlens=cu)
    # packing changes nothing: each sequence alone gives the same rows
    packed = attention(q, k, v, causal=causal, cu_seqlens=cu, backend=backend)
    a, b = 18, 82
    alone = attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal, backend=backend)[0]
    assert torch.allclose(packed[a:b].float(), alone.float(), atol=1e-2)


def test_rows_without_visible_keys_are_zero():
    q, k, v = _qkv(1, 9, 4, 2, 2, 64, torch.float32)
    for backend in ("flash", "triton", "sdpa", "reference"):
        q_ = q.clone().requires_grad_(True)
        out = attention(q_, k, v, causal=True, backend=backend)
        assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5])), backend
        assert out[:, 5:].abs().sum() > 0
        out.sum().backward()
        assert torch.equal(q_.grad[:, :5], torch.zeros_like(q_.grad[:, :5])), backend


@pytest.mark.parametrize("backend", ["flash", "triton"])
def test_strided_inputs(backend):
    """HF hands (B, H, S, D) tensors; their transpose(1, 2) views are read in place."""
    g = torch.Generator().manual_seed(5)
    qh, kh, vh = (torch.randn(2, n, 37, 64, generator=g) for n in (4, 2, 2))
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    assert not q.is_contiguous()
    _assert_two_x_rule(backend, q, k, v, causal=True)
    sliced = torch.randn(2, 37, 4, 128, generator=g)[..., ::2]  # last dim strided: copied first
    out = attention(sliced, k, v, causal=False, backend=backend)
    want = attention(sliced.contiguous(), k, v, causal=False, backend="reference")
    assert (out - want).abs().max() < 1e-5


def test_attn_mask_runs_on_sdpa_and_matches_reference():
    q, k, v = _qkv(2, 12, 12, 4, 2, 64, torch.float32)
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False  # left padding of the second sequence
    mask[1, :, :3, 0] = True  # keep padded query rows finite, as HF's masks do
    out = attention(q, k, v, causal=False, attn_mask=mask)
    want = _attention_reference(q, k, v, False, 1 / 8, attn_mask=mask)
    assert (out - want).abs().max() < 1e-5
    additive = torch.zeros(2, 1, 12, 12).masked_fill(~mask, float("-inf"))
    assert (attention(q, k, v, causal=False, attn_mask=additive) - want).abs().max() < 1e-5


def test_op_registration_opcheck():
    q, k, v = _qkv(2, 19, 19, 4, 2, 64, torch.float32)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.eagle_fast.attention.default, (*args, None, 0, True, 0.125))
    cu = torch.tensor([0, 5, 19], dtype=torch.int32)
    packed = [t.detach()[0].requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.eagle_fast.attention.default, (*packed, cu, 14, False, 0.125))


def test_backend_context_and_errors():
    q, k, v = _qkv(1, 8, 8, 2, 1, 32, torch.float32)
    with attention_backend("reference"):
        inside = attention(q, k, v, causal=True)
    assert torch.equal(inside, _attention_reference(q, k, v, True, 1 / math.sqrt(32)))
    with pytest.raises(ValueError, match="unknown backend"):
        with attention_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        attention(q, k.repeat(1, 1, 3, 1)[:, :, :3], v.repeat(1, 1, 3, 1)[:, :, :3], causal=True)
    with pytest.raises(ValueError, match="expected \\(B, S, H, D\\)"):
        attention(q[0], k[0], v[0], causal=True)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        attention(q[0], k[0], v[0], causal=True, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="share one float dtype"):
        attention(q, k.half(), v, causal=True)
    with pytest.raises(ValueError, match="takes no attn_mask"):
        attention(q, k, v, causal=False, backend="flash", attn_mask=torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case",
    CASES + [(2, 300, 300, 8, 2, 96, True), (1, 257, 257, 2, 2, 256, False)],
    ids=lambda c: "x".join(map(str, c)),
)
def test_cuda_triton_kernels(dtype, case):
    """On a GPU: the dispatcher's CUDA kernel (compiled Triton) under the same rule."""
    b, sq, sk, h, hk, d, causal = case
    q, k, v = (x.cuda() for x in _qkv(b, sq, sk, h, hk, d, dtype))
    _assert_two_x_rule("auto", q, k, v, causal, atol=1e-5)
