"""linear_cross_entropy: every kernel (C++ CPU, the pure-torch body, Triton under the interpreter, CUDA
and compiled Triton on a GPU) against the fp64 reference (the original lm_head over all rows +
F.cross_entropy, as transformers' ForCausalLMLoss), loss and gradients of hidden and weight."""

import functools

import pytest
import torch
import torch.nn.functional as F

from eagle_fast.ops import linear_cross_entropy
from eagle_fast.ops.linear_cross_entropy import _chunked

IGNORE = -100


def _problem(B, T, H, V, learned=0.5, dtype=torch.float32, seed=0, device="cpu"):
    """hidden (B, T, H), weight (V, H) (logits of a few units, as a trained head), labels (B, T)
    with about `learned` of the positions carrying a token and the others IGNORE."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) >= learned] = IGNORE
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def _loss_and_grads(hidden, weight, labels, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def _fp64(hidden, weight, labels, **kw):
    return _loss_and_grads(hidden.double(), weight.double(), labels, backend="reference", **kw)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# (B, T, H, V, learned): V off the chunk (16 MiB of fp32 rows) and off any power of two, H odd.
CASES = {
    "odd": (2, 37, 13, 1003, 0.5),
    "multi_chunk": (3, 90, 5, 40009, 0.8),  # 104 rows per chunk: 3 chunks, the last one partial
    "one_row": (1, 2, 7, 11, 1.0),  # with the shift only position 0 is learned
    "few_learned": (4, 16, 9, 301, 0.05),
    "all_ignored": (2, 9, 6, 50, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_matches_fp64_reference(case):
    B, T, H, V, learned = CASES[case]
    hidden, weight, labels = _problem(B, T, H, V, learned)
    if case == "multi_chunk":
        assert int((labels[:, 1:] != IGNORE).sum()) > 2 * ((16 << 20) // (4 * V))
    want = _fp64(hidden, weight, labels)
    ref = _loss_and_grads(hidden, weight, labels, backend="reference")
    got = _loss_and_grads(hidden, weight, labels)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, g, r, w in zip(("loss", "grad_hidden", "grad_weight"), got, ref, want):
        assert g.shape == w.shape and g.dtype == r.dtype, name
        assert _max_err(g, w) <= 2 * _max_err(r, w) + 1e-6 * max(1.0, w.abs().max().item()), name
    if case == "all_ignored":
        assert got[0].item() == 0.0 and not got[1].any() and not got[2].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_the_references_error(dtype):
    hidden, weight, labels = _problem(2, 40, 24, 2003, 0.6, dtype=dtype, seed=1)
    want = _fp64(hidden, weight, labels)  # fp64 of the same rounded inputs
    ref = _loss_and_grads(hidden, weight, labels, backend="reference")  # PyTorch's own path in dtype
    got = _loss_and_grads(hidden, weight, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for name, g, r, w in zip(("loss", "grad_hidden", "grad_weight"), got, ref, want):
        assert _max_err(g, w) <= 2 * _max_err(r, w) + 1e-6 * max(1.0, w.abs().max().item()), name


def test_non_contiguous_hidden_and_shift_off():
    hidden, weight, labels = _problem(3, 20, 16, 257, 0.7, seed=2)
    wide = torch.randn(20, 3, 32, generator=torch.Generator().manual_seed(3))
    views = {
        "transposed": hidden.transpose(0, 1).contiguous().transpose(0, 1),
        "strided": wide.transpose(0, 1)[..., ::2],
    }
    for name, h in views.items():
        assert not h.is_contiguous(), name
        for shift in (True, False):
            want = _fp64(h, weight, labels, shift=shift)
            got = _loss_and_grads(h, weight, labels, shift=shift)
            for g, w in zip(got, want):
                assert _max_err(g, w) <= 1e-5 * max(1.0, w.abs().max().item()), (name, shift)
    flat = _loss_and_grads(hidden.reshape(-1, 16), weight, labels.reshape(-1), shift=False)  # (N, H) input
    assert _max_err(flat[0], _loss_and_grads(hidden, weight, labels, shift=False)[0]) <= 1e-6


def test_num_items_int_and_tensor():
    hidden, weight, labels = _problem(2, 30, 8, 100, 0.5, seed=4)
    base = _loss_and_grads(hidden, weight, labels)
    n = int((labels[:, 1:] != IGNORE).sum())
    for num_items in (n, 3 * n, torch.tensor(3 * n), torch.tensor([3 * n])):
        got = _loss_and_grads(hidden, weight, labels, num_items=num_items)
        want = _fp64(hidden, weight, labels, num_items=num_items)
        scale = n / int(num_items)
        assert abs(got[0].item() - base[0].item() * scale) <= 1e-5
        for g, w in zip(got, want):
            assert _max_err(g, w) <= 1e-5 * max(1.0, w.abs().max().item())


def test_tied_weight_gradients_add_up():
    """The lm_head weight is the embedding table: its gradient sums the embedding's and the head's."""
    torch.manual_seed(5)
    V, H = 97, 12
    labels = torch.randint(0, V, (2, 15))
    labels[:, :4] = IGNORE
    grads = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(6)  # the same parameters for both paths
        emb, proj = torch.nn.Embedding(V, H), torch.nn.Linear(H, H)
        hidden = torch.tanh(proj(emb(labels.clamp(min=0))))
        linear_cross_entropy(hidden, emb.weight, labels, backend=backend).backward()
        grads[backend] = (emb.weight.grad, proj.weight.grad)
    for a, b in zip(grads["auto"], grads["reference"]):
        assert _max_err(a, b) <= 1e-6


def test_gradients_only_where_asked():
    hidden, weight, labels = _problem(2, 10, 6, 40, 0.8, seed=8)
    h = hidden.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, weight, labels)  # frozen head (LoRA): no grad_weight work
    (gh,) = torch.autograd.grad(loss, h)
    assert _max_err(gh, _fp64(hidden, weight, labels)[1]) <= 1e-5
    y = labels.reshape(-1)[:5].clamp(min=0)
    _, gh0, gw0 = torch.ops.eagle_fast.linear_cross_entropy(hidden.reshape(-1, 6)[:5], weight, y, IGNORE, True, False)
    assert gh0.shape == (5, 6) and gw0.shape == (0,)
    with torch.no_grad():
        assert abs(linear_cross_entropy(h, weight, labels).item() - loss.item()) <= 1e-6


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_on_cpu(hidden_dtype):
    """Under autocast the head runs in bf16, as the lm_head Linear would: fp32 master weight, hidden
    fp32 or already bf16 (the output of autocast layers)."""
    hidden, weight, labels = _problem(2, 24, 16, 509, 0.6, seed=9)
    hidden = hidden.to(hidden_dtype)
    out = {}
    for backend in ("auto", "reference"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, labels, backend=backend)
        out[backend] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    want = _fp64(hidden.bfloat16(), weight.bfloat16(), labels)
    assert out["auto"][0].dtype == torch.float32
    assert out["auto"][1].dtype == hidden_dtype and out["auto"][2].dtype == torch.float32
    for g, r, w in zip(out["auto"], out["reference"], want):
        assert _max_err(g, w) <= 2 * _max_err(r, w) + 1e-6 * max(1.0, w.abs().max().item())


def test_opcheck_registered_op():
    hidden, weight, labels = _problem(1, 12, 5, 33, 1.0, seed=10)
    h = hidden.reshape(12, 5).requires_grad_(True)
    w = weight.requires_grad_(True)
    y = labels.reshape(12).clone()
    y[3] = IGNORE  # an ignored row inside the op contributes nothing
    for flags in ((True, True), (False, False), (True, False)):
        torch.library.opcheck(torch.ops.eagle_fast.linear_cross_entropy.default, (h, w, y, IGNORE, *flags))
    loss, gh, gw = torch.ops.eagle_fast.linear_cross_entropy(h.detach(), w.detach(), y, IGNORE, True, True)
    want = _fp64(h.detach()[None], w.detach(), y[None], shift=False)
    n = int((y != IGNORE).sum())
    assert abs(loss.item() - want[0].item() * n) <= 1e-5
    assert not gh[3].any() and _max_err(gh / n, want[1][0]) <= 1e-6 and _max_err(gw / n, want[2]) <= 1e-6


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((torch.zeros(4), torch.zeros(3, 4), torch.zeros(4, dtype=torch.long)), {}, "hidden must be"),
        (
            (torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(2, dtype=torch.long)),
            {},
            "weight must be .V, H. with H = 4",
        ),
        (
            (torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long)),
            {},
            "weight has dtype torch.float64",
        ),
        (
            (torch.zeros(2, 4), torch.zeros(3, 4, device="meta"), torch.zeros(2, dtype=torch.long)),
            {},
            "weight is on meta",
        ),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), {}, "labels must have shape"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2)), {}, "labels must be int64 or int32"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 3])), dict(shift=False), "labels hold 3"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, -5])), dict(shift=False), "labels hold -5"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 1])), dict(num_items=2.5), "num_items must be"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 1])), dict(backend="cuBLAS"), "unknown backend"),
    ],
)
def test_bad_input_is_named(args, kw, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*args, **kw)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_row_pass_matches_reference(dtype):
    pytest.importorskip("triton")
    from eagle_fast.triton_kernels.loss.linear_cross_entropy import linear_cross_entropy_rows_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)
    hidden, weight, labels = _problem(2, 9, 7, 203, 0.7, dtype=dtype, seed=11, device=device)
    want = _fp64(hidden, weight, labels)
    ref = _loss_and_grads(hidden, weight, labels, backend="reference")
    got = _loss_and_grads(hidden, weight, labels, backend="triton")
    for g, r, w in zip(got, ref, want):
        assert g.dtype == r.dtype and _max_err(g, w) <= 2 * _max_err(r, w) + 1e-6 * max(1.0, w.abs().max().item())
    # blocks of 64 over V = 203: three full blocks and a partial one; an ignored row inside
    y = labels.reshape(-1)[:10].clamp(min=0)
    y[4] = IGNORE
    rows = functools.partial(linear_cross_entropy_rows_triton, block_v=64)
    h = hidden.reshape(-1, 7)[:10]
    got = _chunked(h, weight, y, IGNORE, True, True, row_pass=rows)
    want = _chunked(h.double(), weight.double(), y, IGNORE, True, True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 0.05
    for g, w in zip(got, want):
        assert _max_err(g, w) <= tol * max(1.0, w.abs().max().item())
    assert not got[1][4].any()


def test_reference_equals_transformers_loss():
    """The reference is transformers' ForCausalLMLoss on the lm_head logits (mean, and sum / num_items)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, labels = _problem(2, 17, 8, 64, 0.6, seed=12)
    logits = F.linear(hidden, weight)
    assert torch.equal(
        linear_cross_entropy(hidden, weight, labels, backend="reference"), ForCausalLMLoss(logits, labels, 64)
    )
    assert torch.equal(
        linear_cross_entropy(hidden, weight, labels, num_items=torch.tensor(40), backend="reference"),
        ForCausalLMLoss(logits, labels, 64, num_items_in_batch=torch.tensor(40)),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_reference(backend, dtype):
    for case in ("odd", "multi_chunk", "all_ignored"):
        B, T, H, V, learned = CASES[case]
        hidden, weight, labels = _problem(B, T, H, V, learned, dtype=dtype, device="cuda")
        want = _fp64(hidden, weight, labels)
        ref = _loss_and_grads(hidden, weight, labels, backend="reference")
        got = _loss_and_grads(hidden, weight, labels, backend=backend)
        for g, r, w in zip(got, ref, want):
            assert _max_err(g, w) <= 2 * _max_err(r, w) + 1e-5 * max(1.0, w.abs().max().item()), case
