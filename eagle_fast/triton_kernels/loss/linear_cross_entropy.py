"""Triton row pass of eagle_fast::linear_cross_entropy (same maths as csrc/loss/linear_cross_entropy.h).

The op's chunk loop (eagle_fast/ops/linear_cross_entropy.py) makes logits z = h_c @ W^T for a chunk of
rows with torch.mm; this kernel then does, for every row r of the chunk (one program per row),

  loop over V in BLOCK_V blocks: running max m and s = sum exp(z - m) (rescaled when m grows)
  lse = m + log(s);   loss[r] = lse - z[r, y_r]                    (0 for ignore_index rows)
  with grads, a second loop: z[r, j] <- exp(z[r, j] - lse) - [j == y_r]  (0 for ignore_index rows)

in fp32 (fp64 for fp64 logits): loads are upcast first (bf16 arithmetic is wrong in the CPU
interpreter), grads stored in z's dtype through `cast_out` (round-to-nearest-even, as torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_fast.triton_kernels.utils import cast_out

_MAX_BLOCK_V = 4096


@triton.jit
def _lce_row_kernel(
    z_ptr, labels_ptr, loss_ptr, V, stride_z, IGNORE, WITH_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr
):
    r = tl.program_id(0)
    row = z_ptr + r.to(tl.int64) * stride_z
    y = tl.load(labels_ptr + r)
    keep = y != IGNORE
    y_safe = tl.where(keep, y, 0)
    # Read z[y] before the grad loop can overwrite it (the reductions below order it on a GPU too).
    z_label = tl.load(row + y_safe).to(ACC)
    cols = tl.arange(0, BLOCK_V)
    lowest = -3.4028234663852886e38  # not -inf: a -inf logit then adds exp(-inf) = 0, not nan
    m = tl.full((), lowest, ACC)
    s = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        x = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + r, tl.where(keep, lse - z_label, 0.0))
    if WITH_GRAD:
        for start in range(0, V, BLOCK_V):
            j = start + cols
            ok = j < V
            x = tl.load(row + j, mask=ok, other=0.0).to(ACC)
            g = tl.exp(x - lse) - tl.where(j == y_safe, 1.0, 0.0)
            g = tl.where(keep, g, 0.0)
            tl.store(row + j, cast_out(g, z_ptr.dtype.element_ty), mask=ok)


def linear_cross_entropy_rows_triton(
    z: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_grad: bool, block_v: int | None = None
) -> torch.Tensor:
    """Row pass over a logits chunk z (rows, V) (row-contiguous), labels (rows,) int64: returns the row
    losses (rows,) in fp32 (fp64 for fp64 z); with_grad overwrites z with softmax - onehot."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(
            f"linear_cross_entropy (triton): z must be a row-contiguous (rows, V) chunk, got "
            f"shape {tuple(z.shape)} strides {z.stride()}"
        )
    rows, V = z.shape
    if labels.shape != (rows,):
        raise ValueError(f"linear_cross_entropy (triton): labels {tuple(labels.shape)} for {rows} rows")
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    losses = torch.empty(rows, dtype=acc, device=z.device)
    if rows == 0:
        return losses
    block = block_v or min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    _lce_row_kernel[(rows,)](
        z,
        labels.to(torch.int64).contiguous(),
        losses,
        V,
        z.stride(0),
        int(ignore_index),
        WITH_GRAD=bool(with_grad),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_V=block,
    )
    return losses
