"""resize_concat: every expert's feature map -> one G x G grid, concatenated on channels.

Eagle's fusion (the original's channel-concat of resampled expert maps), per expert i:
  map (B, C_i, H_i, W_i) or token grid (B, H_i*W_i, C_i)
    -> optional pixel_unshuffle(u_i): (B, C_i*u_i^2, H_i/u_i, W_i/u_i), channel c*u^2 + u*dy + dx
    -> bilinear align_corners=True to (G, G), computed in fp32 (fp64 for fp64 inputs)
    -> flattened row-major into its channel slice of the output (B, G*G, sum C_i*u_i^2)

The kernels write every slice straight into the output, and the backward scatters the bilinear
weights back into each input's gradient with fp32 accumulation (deterministic on CPU). Token grids
are passed to the kernels as channels-last views, so no layout copy is made either way.

Three parts, in order: the pure-torch reference (the original algorithm: F.interpolate + cat; CPU
fallback and test oracle), the registration of `eagle_fast::resize_concat` (+ its backward op,
fake kernels, autograd), and the public `resize_concat`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eagle_fast.ops._library import has_cuda_kernels, has_triton, load_compiled, reference_active

# ----------------------------------------------------------------------------- reference


def _resize_concat_reference(features: list[torch.Tensor], grid: int, unshuffle: list[int]) -> torch.Tensor:
    outs = []
    for x, u in zip(features, unshuffle):  # x: (B, C, H, W)
        if u > 1:
            x = F.pixel_unshuffle(x, u)
        if tuple(x.shape[-2:]) != (grid, grid):
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # Eagle resizes in fp32
            x = F.interpolate(x.to(acc), size=(grid, grid), mode="bilinear", align_corners=True).to(x.dtype)
        outs.append(x.flatten(2).transpose(1, 2))  # (B, G*G, C)
    return torch.cat(outs, dim=-1)


def _resize_concat_backward_reference(
    grad: torch.Tensor, features: list[torch.Tensor], grid: int, unshuffle: list[int]
) -> list[torch.Tensor]:
    """Vector-Jacobian product of the reference, the oracle for every backward kernel and the
    backward op's body without the compiled library.

    Written with the backward ops autograd would run for the reference (slice of the concat,
    upsample_bilinear2d_backward in fp32 / fp64, pixel_shuffle as the inverse permutation of
    pixel_unshuffle) rather than with torch.autograd.grad: a custom op's body runs below the
    autograd dispatch key, where the reference's forward records no graph to differentiate.
    """
    out = []
    offset = 0
    for x, u in zip(features, unshuffle):  # x: (B, C, H, W)
        b, c, h, w = x.shape
        cu, hu, wu = c * u * u, h // u, w // u  # the map after pixel_unshuffle: (B, C*u^2, H/u, W/u)
        g = grad[:, :, offset : offset + cu].transpose(1, 2).reshape(b, cu, grid, grid)  # (B, C*u^2, G, G)
        offset += cu
        if (hu, wu) != (grid, grid):
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # as the forward's resize
            g = torch.ops.aten.upsample_bilinear2d_backward(g.to(acc), [grid, grid], [b, cu, hu, wu], True).to(
                x.dtype
            )  # (B, C*u^2, H/u, W/u)
        if u > 1:
            g = F.pixel_shuffle(g, u)  # (B, C, H, W)
        out.append(torch.empty_like(x).copy_(g))  # strided like the input, never a view of grad
    return out


# ----------------------------------------------------------------------------- registration

_OP = "eagle_fast::resize_concat"
_BWD = "eagle_fast::resize_concat_backward"


def _register() -> None:
    if not load_compiled():  # same op names, the references as their bodies
        torch.library.custom_op(_OP, mutates_args=())(_resize_concat_reference)
        torch.library.custom_op(_BWD, mutates_args=())(_resize_concat_backward_reference)
    if has_triton() and not has_cuda_kernels():
        from eagle_fast.triton_kernels.vision.resize_concat import resize_concat_backward_triton, resize_concat_triton

        torch.library.register_kernel(_OP, "cuda", resize_concat_triton)
        torch.library.register_kernel(_BWD, "cuda", resize_concat_backward_triton)

    @torch.library.register_fake(_OP)
    def _fake(features, grid, unshuffle):
        channels = sum(f.shape[1] * u * u for f, u in zip(features, unshuffle))
        return features[0].new_empty((features[0].shape[0], grid * grid, channels))

    @torch.library.register_fake(_BWD)
    def _fake_bwd(grad, features, grid, unshuffle):
        return [torch.empty_like(f) for f in features]

    def _setup(ctx, inputs, output):
        features, grid, unshuffle = inputs
        ctx.save_for_backward(*features)
        ctx.grid, ctx.unshuffle = grid, unshuffle

    def _backward(ctx, grad):
        grads = torch.ops.eagle_fast.resize_concat_backward(
            grad.contiguous(), list(ctx.saved_tensors), ctx.grid, ctx.unshuffle
        )
        return list(grads), None, None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup)


_register()


# ----------------------------------------------------------------------------- public API


def _as_map(x: torch.Tensor, i: int) -> torch.Tensor:
    """(B, C, H, W) as is; (B, N, C) token grid -> a (B, C, H, W) channels-last view, no copy."""
    if x.dim() == 4:
        if x.shape[2] != x.shape[3]:
            raise ValueError(f"feature {i}: map {tuple(x.shape)} is not square")
        return x
    if x.dim() == 3:
        b, n, c = x.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"feature {i}: token grid of {n} tokens is not square")
        return x.reshape(b, side, side, c).permute(0, 3, 1, 2)  # a view whenever strides allow
    raise ValueError(f"feature {i}: {x.dim()}-D, expected a map (B, C, H, W) or tokens (B, H*W, C)")


def resize_concat(
    features: Sequence[torch.Tensor], grid: int, unshuffle: Sequence[int] | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Resample every feature map to a grid x grid map and concatenate them on channels.

    Args:
        features: maps (B, C_i, H_i, W_i) or square token grids (B, H_i*W_i, C_i); one dtype
            (fp32, bf16, fp16, fp64) and one device; any strides (channels-last, views).
        grid: G, the output grid side (32 for Eagle).
        unshuffle: per feature, a pixel_unshuffle factor u_i >= 1 applied before resizing (SAM: 2).
        backend: "auto" (the dispatcher: C++ on CPU, CUDA or Triton on GPU), "reference" or
            "triton" (the Triton kernels directly; on CPU under TRITON_INTERPRET=1).

    Returns:
        (B, G*G, sum_i C_i * u_i^2) in the features' dtype, cells row-major, slices in input order.
        Differentiable with respect to every feature.

    Raises:
        ValueError: naming the feature index and the problem.
    """
    if len(features) == 0:
        raise ValueError("resize_concat: no features given")
    if grid < 1:
        raise ValueError(f"resize_concat: grid must be >= 1, got {grid}")
    unshuffle = [1] * len(features) if unshuffle is None else [int(u) for u in unshuffle]
    if len(unshuffle) != len(features):
        raise ValueError(f"resize_concat: {len(unshuffle)} unshuffle factors for {len(features)} features")
    maps = []
    for i, (x, u) in enumerate(zip(features, unshuffle)):
        m = _as_map(x, i)
        if m.dtype != features[0].dtype or m.device != features[0].device:
            raise ValueError(
                f"feature {i}: {m.dtype} on {m.device}, feature 0 is {features[0].dtype} on {features[0].device}"
            )
        if m.shape[0] != features[0].shape[0]:
            raise ValueError(f"feature {i}: batch {m.shape[0]}, feature 0 has {features[0].shape[0]}")
        if u < 1 or m.shape[2] % u:
            raise ValueError(f"feature {i}: unshuffle {u} does not divide its {m.shape[2]}x{m.shape[3]} map")
        maps.append(m)
    if backend == "auto" and reference_active():
        backend = "reference"
    if backend == "auto":
        return torch.ops.eagle_fast.resize_concat(maps, grid, unshuffle)
    if backend == "reference":
        return _resize_concat_reference(maps, grid, unshuffle)
    if backend == "triton":
        from eagle_fast.triton_kernels.vision.resize_concat import resize_concat_triton

        return resize_concat_triton(maps, grid, unshuffle)
    raise ValueError(f"resize_concat: unknown backend {backend!r} (auto, reference, triton)")
