"""linear_cross_entropy: the LM head and its causal-LM loss in one op, logits never materialized.

What the original model computes (transformers' ForCausalLMLoss), for hidden (B, T, H), the lm_head
weight (V, H) and labels (B, T):
    logits = hidden @ W^T                  (B, T, V) in the input dtype, then upcast to fp32
    loss   = sum_t CE(logits_t, labels[t+1]) / num_items     (positions whose label is ignore_index
                                                             add nothing; num_items defaults to their count)
That holds a (B*T, V) fp32 tensor (and its gradient) for every position, although in Eagle SFT only
the answer tokens are learned (image rows and prompt tokens carry -100).

The fast path keeps the n learned rows only (index_select, differentiable), then the registered
`eagle_fast::linear_cross_entropy` walks them in chunks of rows: per chunk logits = h_c @ W^T, a
per-row pass (logsumexp, loss, softmax - onehot in place) and the two gradient matmuls, so only one
(rows, V) chunk exists at a time. Gradients are computed in the forward; autograd's backward only
scales them by the incoming gradient (and 1 / num_items through the division).

Three parts, in order: the pure-torch reference (the original algorithm; CPU fallback under
reference_ops() and test oracle) with the pure-torch chunked body of the op, the registration (fake
kernel, autograd), and the public `linear_cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from eagle_fast.ops._library import has_cuda_kernels, has_triton, load_compiled, reference_active

# ----------------------------------------------------------------------------- reference


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # the reference's logits.float()


def _linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,) already shifted -> the sum of the row losses: the
    lm_head over ALL rows, logits upcast (fp64 stays fp64), F.cross_entropy(reduction="sum")."""
    logits = F.linear(hidden, weight)  # (N, V) in the input dtype, as the model's lm_head
    return F.cross_entropy(logits.to(_acc_dtype(logits.dtype)), labels, ignore_index=ignore_index, reduction="sum")


def _rows_torch(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_grad: bool) -> torch.Tensor:
    """The per-row pass in torch ops over a logits chunk z (rows, V): row losses (rows,) in fp32 (fp64);
    with_grad overwrites z with softmax - onehot (0 on ignore_index rows) in z's dtype."""
    zf = z.to(_acc_dtype(z.dtype))
    keep = labels != ignore_index
    y = torch.where(keep, labels, 0)
    lse = torch.logsumexp(zf, dim=1)
    losses = torch.where(keep, lse - zf.gather(1, y[:, None])[:, 0], 0.0)
    if with_grad:
        g = torch.exp(zf - lse[:, None])
        g[torch.arange(z.shape[0], device=z.device), y] -= 1.0
        z.copy_(g * keep[:, None])
    return losses


RowPass = Callable[[torch.Tensor, torch.Tensor, int, bool], torch.Tensor]

# Rows per chunk: a (rows, V) fp32 chunk of about this many bytes (min 1 row), as the C++ kernels.
_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 32 << 20}


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
    row_pass: RowPass = _rows_torch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's algorithm in torch ops around a row pass (the torch one, or Triton's): hidden (n, H),
    weight (V, H), labels (n,) -> (sum of row losses 0-d, grad_hidden (n, H) | (0,), grad_weight (V, H) | (0,))."""
    n, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    labels = labels.to(torch.int64)
    with_grad = compute_grad_hidden or compute_grad_weight
    gh = hidden.new_empty(hidden.shape if compute_grad_hidden else (0,))
    gw = weight.new_zeros(weight.shape, dtype=acc) if compute_grad_weight else weight.new_empty((0,))
    rows = max(1, _CHUNK_BYTES.get(hidden.device.type, 16 << 20) // (4 * max(V, 1)))
    losses = []
    for r0 in range(0, n, rows):
        h = hidden[r0 : r0 + rows]
        z = torch.mm(h, weight.t())  # (rc, V), input dtype
        losses.append(row_pass(z, labels[r0 : r0 + rows], ignore_index, with_grad))
        if compute_grad_hidden:
            torch.mm(z, weight, out=gh[r0 : r0 + rows])
        if compute_grad_weight:  # fp32 accumulation of (V, rc) @ (rc, H)
            if z.dtype == acc:
                gw.addmm_(z.t(), h)
            elif z.is_cuda:  # the bf16/fp16 GEMM with an fp32 result
                gw.add_(torch.mm(z.t(), h, out_dtype=acc))
            else:  # CPU has no such GEMM: bf16/fp16 -> fp32 is exact
                gw.addmm_(z.t().to(acc), h.to(acc))
    loss = torch.cat(losses).sum() if losses else hidden.new_zeros((), dtype=acc)
    return loss, gh, gw.to(weight.dtype) if compute_grad_weight else gw


def _op_body(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _chunked(hidden, weight, labels, ignore_index, compute_grad_hidden, compute_grad_weight)


def _op_body_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from eagle_fast.triton_kernels.loss.linear_cross_entropy import linear_cross_entropy_rows_triton

    return _chunked(
        hidden,
        weight,
        labels,
        ignore_index,
        compute_grad_hidden,
        compute_grad_weight,
        row_pass=linear_cross_entropy_rows_triton,
    )


# ----------------------------------------------------------------------------- registration

_OP = "eagle_fast::linear_cross_entropy"


def _register() -> None:
    if not load_compiled():  # same op name, the pure-torch chunked body
        torch.library.custom_op(_OP, mutates_args=())(_op_body)
    if has_triton() and not has_cuda_kernels():
        torch.library.register_kernel(_OP, "cuda", _op_body_triton)

    @torch.library.register_fake(_OP)
    def _fake(hidden, weight, labels, ignore_index, compute_grad_hidden, compute_grad_weight):
        loss = hidden.new_empty((), dtype=_acc_dtype(hidden.dtype))
        gh = hidden.new_empty(hidden.shape if compute_grad_hidden else (0,))
        gw = weight.new_empty(weight.shape if compute_grad_weight else (0,))
        return loss, gh, gw

    def _setup(ctx, inputs, output):
        _, gh, gw = output
        ctx.save_for_backward(gh, gw)
        ctx.flags = (inputs[4], inputs[5])
        ctx.mark_non_differentiable(gh, gw)
        ctx.set_materialize_grads(False)  # else autograd fills zero (V, H) grads for gh, gw first

    def _backward(ctx, grad_loss, _grad_gh, _grad_gw):
        gh, gw = ctx.saved_tensors
        want_h, want_w = ctx.flags
        if grad_loss is None:  # the loss sum took no part in what is differentiated
            return None, None, None, None, None, None
        return (gh * grad_loss if want_h else None, gw * grad_loss if want_w else None, None, None, None, None)

    torch.library.register_autograd(_OP, _backward, setup_context=_setup)


_register()


class _PrecomputedGrads(torch.autograd.Function):
    """backend="triton": attaches the gradients the chunk loop already computed to the loss sum."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, gh, gw):
        ctx.save_for_backward(gh, gw)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        return (
            gh * grad if ctx.needs_input_grad[0] else None,
            gw * grad if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- public API


def _check(hidden, weight, labels, num_items) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError(
            f"linear_cross_entropy: hidden must be a floating (B, T, H) or (N, H) tensor, got {_describe(hidden)}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, H) with H = {hidden.shape[-1]}, got {_describe(weight)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: weight has dtype {weight.dtype}, hidden has {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: weight is on {weight.device}, hidden on {hidden.device}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels must have shape {tuple(hidden.shape[:-1])} (hidden's "
            f"leading dims), got {_describe(labels)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: labels are on {labels.device}, hidden on {hidden.device}")
    if num_items is not None and not (
        isinstance(num_items, int) or (isinstance(num_items, torch.Tensor) and num_items.numel() == 1)
    ):
        raise ValueError(
            f"linear_cross_entropy: num_items must be None, an int or a one-element tensor, got {_describe(num_items)}"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_items: int | torch.Tensor | None = None,
    shift: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal-LM loss of the LM head `weight` on `hidden`, as transformers' ForCausalLMLoss computes it
    from `logits = hidden @ weight.T`, without materializing the logits.

    Args:
        hidden: (B, T, H) or (N, H) final hidden states; fp32, bf16, fp16 or fp64; any strides.
        weight: (V, H) the lm_head weight (may be tied to the embeddings), hidden's dtype and device.
        labels: (B, T) or (N,) int64/int32 token ids in [0, V) or ignore_index.
        ignore_index: label of positions that are not learned.
        num_items: the divisor (an int or a one-element tensor, e.g. the trainer's global
            num_items_in_batch); None: the number of learned positions (at least 1, so a batch with
            no learned position gives 0, where transformers' mean would give nan).
        shift: position t predicts labels[t + 1] (the last position of each row predicts nothing);
            False: position t predicts labels[t].
        backend: "auto" (the dispatcher: C++ on CPU, CUDA or Triton on GPU), "reference" (the
            original lm_head over all rows + F.cross_entropy) or "triton" (the Triton row pass
            directly; on CPU under TRITON_INTERPRET=1).

    Returns:
        The 0-d loss, fp32 (fp64 for fp64 inputs), differentiable with respect to hidden and weight.
        Under torch.autocast, hidden and weight are first cast to the autocast dtype (the reference
        lm_head would run in it).

    Raises:
        ValueError: naming the argument and the problem.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):  # before the dtype checks: e.g. bf16 hidden, fp32 weight
        dt = torch.get_autocast_dtype(device_type)
        hidden, weight = _autocast(hidden, dt), _autocast(weight, dt)
        with torch.autocast(device_type, enabled=False):  # keeps the op's fp32 accumulations fp32
            return linear_cross_entropy(
                hidden, weight, labels, ignore_index=ignore_index, num_items=num_items, shift=shift, backend=backend
            )
    _check(hidden, weight, labels, num_items)
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"linear_cross_entropy: unknown backend {backend!r} (auto, reference, triton)")
    if shift:  # HF: labels padded with one ignore_index on the right, then shifted left
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h_flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H), a view whenever strides allow
    y_flat = labels.reshape(-1)
    if backend == "auto" and reference_active():
        backend = "reference"
    if backend == "reference":
        loss = _linear_cross_entropy_reference(h_flat, weight, y_flat.to(torch.int64), ignore_index)
        count = (y_flat != ignore_index).sum()
        return loss / (count.clamp(min=1) if num_items is None else _divisor(num_items, loss))
    rows = (y_flat != ignore_index).nonzero().squeeze(1)  # the learned positions (a host sync)
    h = h_flat.index_select(0, rows)  # (n, H); its backward scatters grad rows back, zeros elsewhere
    y = y_flat.index_select(0, rows).to(torch.int64)
    if rows.numel() and bool(((y < 0) | (y >= weight.shape[0])).any()):
        bad = y[(y < 0) | (y >= weight.shape[0])][0].item()
        raise ValueError(
            f"linear_cross_entropy: labels hold {bad}, outside [0, {weight.shape[0]}) and not "
            f"ignore_index {ignore_index}"
        )
    grad_on = torch.is_grad_enabled()
    want_h, want_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    if backend == "auto":
        loss, _, _ = torch.ops.eagle_fast.linear_cross_entropy(h, weight, y, ignore_index, want_h, want_w)
    else:
        loss, gh, gw = _op_body_triton(h.detach(), weight.detach(), y, ignore_index, want_h, want_w)
        loss = _PrecomputedGrads.apply(h, weight, loss, gh, gw) if want_h or want_w else loss
    return loss / (max(rows.numel(), 1) if num_items is None else _divisor(num_items, loss))


def _autocast(x, dtype: torch.dtype):
    """What autocast does to an lm_head input: floating tensors other than fp64 go to its dtype."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(dtype)
    return x


def _divisor(num_items: int | torch.Tensor, loss: torch.Tensor) -> int | torch.Tensor:
    return num_items.to(loss.device).reshape(()) if isinstance(num_items, torch.Tensor) else num_items
