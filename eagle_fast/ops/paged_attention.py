"""paged_attention: causal attention of new query rows against a block-paged KV cache (forward only).

Semantics (every implementation, the reference first):

  q             (Tq, Hq, D): the new query rows of B sequences, packed one after another.
  cu_seqlens_q  (B + 1,) int32: sequence b owns q rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1,
                Lq_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] >= 0 of them.
  k_cache,      (num_blocks, block_size, Hkv, D): key / value rows in fixed-size blocks; one cache
  v_cache       position is (physical block, slot).
  block_table   (B, max_blocks_per_seq) int32: row b lists sequence b's physical blocks in order,
                so key j of sequence b lives at block_table[b, j // block_size], slot
                j % block_size. Only the first ceil(Lk_b / block_size) entries of a row are read:
                the rest may hold anything (e.g. -1). Blocks may appear in any order in the cache
                and in several rows (a prefix shared between sequences).
  seqlens_k     (B,) int32: Lk_b, the number of keys of sequence b INCLUDING its Lq_b new rows,
                whose K/V the caller has already written to the cache (they are keys
                Lk_b - Lq_b .. Lk_b - 1). Lq_b <= Lk_b <= max_blocks_per_seq * block_size.

  out[cu_seqlens_q[b] + i, h] = sum_j p_j v_j,  p = softmax_j(scale * q_i . k_j) over the keys
  j <= i + Lk_b - Lq_b (causal, aligned bottom-right: a decode step, Lq = 1, sees all Lk keys;
  a prefill chunk sees the cached prefix and the chunk's rows up to its own), with query head h
  reading kv head h // (Hq // Hkv) (grouped-query attention). Every query row sees at least one
  key (Lq <= Lk). scale defaults to 1 / sqrt(D). Scores, softmax and sums are fp32 (fp64 for fp64
  inputs); out is (Tq, Hq, D), contiguous, in q's dtype. Not differentiable (inference).

A contiguous per-sequence cache is the case block_size = its capacity, one block per sequence.

Three parts, in order: the pure-torch reference (gathers each sequence's blocks, plain softmax;
the test oracle and the fallback without the compiled library), the registration of
`eagle_fast::paged_attention` (schema and C++ CPU kernel in csrc/attention/; Triton on CUDA, the
reference where neither is built; fake kernel), and the public `paged_attention`, which validates
its arguments and raises ValueError naming the bad one.
"""

from __future__ import annotations

import math

import torch

from eagle_fast.ops._library import has_triton, load_compiled, reference_active

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ----------------------------------------------------------------------------- reference


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` rows (length, H, D) of a sequence whose blocks are `blocks` (a copy)."""
    return cache.index_select(0, blocks.to(torch.int64)).flatten(0, 1)[:length]


def _paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
) -> torch.Tensor:
    """Per sequence: gather its K/V blocks, softmax(q k^T * scale + bottom-right causal mask) v in
    fp32 (fp64 for fp64); q's dtype out. (max_seqlen_q is unused: the op's signature.)"""
    acc = _acc_dtype(q.dtype)
    bs = k_cache.shape[1]
    group = q.shape[1] // max(k_cache.shape[2], 1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cu, lk_all = cu_seqlens_q.tolist(), seqlens_k.tolist()
    for b, lk in enumerate(lk_all):
        a, e = cu[b], cu[b + 1]
        if e == a:
            continue
        blocks = block_table[b, : (lk + bs - 1) // bs]
        k = _gather(k_cache, blocks, lk).to(acc).repeat_interleave(group, 1)  # (Lk, Hq, D)
        v = _gather(v_cache, blocks, lk).to(acc).repeat_interleave(group, 1)
        s = torch.einsum("ihd,jhd->hij", q[a:e].to(acc), k) * scale  # (Hq, Lq, Lk)
        i = torch.arange(e - a, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (lk - (e - a)), float("-inf"))
        out[a:e] = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- registration

_OP = "eagle_fast::paged_attention"


def _paged_attention_cuda(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale):
    """CUDA: the Triton kernel; fp64 and head dims over 256 (outside its tiles) on the reference."""
    if q.dtype == torch.float64 or q.shape[-1] > 256:
        return _paged_attention_reference(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale
        )
    from eagle_fast.triton_kernels.attention.paged import paged_attention_triton

    return paged_attention_triton(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale)


def _register() -> None:
    if not load_compiled():  # same op name and schema, the reference as its body
        torch.library.custom_op(_OP, mutates_args=())(_paged_attention_reference)
    # No CUDA C++ kernel: Triton on CUDA, or the reference where triton is missing.
    torch.library.register_kernel(_OP, "cuda", _paged_attention_cuda if has_triton() else _paged_attention_reference)

    @torch.library.register_fake(_OP)
    def _fake(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale):
        return q.new_empty(q.shape)


_register()


# ----------------------------------------------------------------------------- public API


def _fail(msg: str):
    raise ValueError(f"paged_attention: {msg}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, {x.dtype} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def _check_shapes(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k) -> None:
    cache = "(num_blocks, block_size, Hkv, D)"
    for name, x, dims, layout in (
        ("q", q, 3, "(Tq, Hq, D)"),
        ("k_cache", k_cache, 4, cache),
        ("v_cache", v_cache, 4, cache),
        ("block_table", block_table, 2, "(B, max_blocks_per_seq)"),
        ("cu_seqlens_q", cu_seqlens_q, 1, "(B + 1,)"),
        ("seqlens_k", seqlens_k, 1, "(B,)"),
    ):
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            _fail(f"{name} must be a {dims}-D tensor {layout}, got {_describe(x)}")
        if x.device != q.device:
            _fail(f"{name} is on {x.device}, q on {q.device}")
    if q.dtype not in _FLOATS:
        _fail(f"q has dtype {q.dtype} (float16, bfloat16, float32, float64 supported)")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            _fail(f"{name} has dtype {x.dtype}, q has {q.dtype}")
    if k_cache.shape != v_cache.shape:
        _fail(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.shape[1] < 1:
        _fail(f"k_cache has block_size {k_cache.shape[1]}, must be >= 1")
    if q.shape[2] != k_cache.shape[3]:
        _fail(f"head dim of q ({q.shape[2]}) and k_cache ({k_cache.shape[3]}) differ")
    if k_cache.shape[2] == 0 or q.shape[1] % k_cache.shape[2]:
        _fail(f"q's {q.shape[1]} heads are not a multiple of k_cache's {k_cache.shape[2]} kv heads")
    for name, x in (("block_table", block_table), ("cu_seqlens_q", cu_seqlens_q), ("seqlens_k", seqlens_k)):
        if x.dtype not in (torch.int32, torch.int64):
            _fail(f"{name} must hold int32 (int64 is converted), got {x.dtype}")
    b = seqlens_k.shape[0]
    if cu_seqlens_q.shape[0] != b + 1:
        _fail(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} offsets, seqlens_k has {b} sequences (expected {b + 1})")
    if block_table.shape[0] != b:
        _fail(f"block_table has {block_table.shape[0]} rows, seqlens_k has {b} sequences")


def _check_values(q, k_cache, block_table, cu_seqlens_q, seqlens_k) -> int:
    """The checks that read the metadata (one device sync on CUDA); returns the longest Lq."""
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        _fail(
            f"cu_seqlens_q must rise from 0 to the {q.shape[0]} rows of q, got {cu[:8]}{'...' if len(cu) > 8 else ''}"
        )
    lk = seqlens_k.tolist()
    num_blocks, bs = k_cache.shape[0], k_cache.shape[1]
    capacity = block_table.shape[1] * bs
    table = block_table.tolist()
    for b, n in enumerate(lk):
        lq = cu[b + 1] - cu[b]
        if n < lq:
            _fail(f"sequence {b}: seqlens_k {n} < its {lq} query rows (seqlens_k counts the new rows too)")
        if n > capacity:
            _fail(
                f"sequence {b}: seqlens_k {n} exceeds block_table's {block_table.shape[1]} blocks of "
                f"{bs} rows ({capacity})"
            )
        used = table[b][: (n + bs - 1) // bs]
        bad = [x for x in used if not 0 <= x < num_blocks]
        if bad:
            _fail(f"sequence {b}: block_table holds block {bad[0]}, outside the cache's {num_blocks} blocks")
    return max((b - a for a, b in zip(cu, cu[1:])), default=0)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_k: torch.Tensor,
    *,
    scale: float | None = None,
    max_seqlen_q: int | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of packed new query rows against a paged KV cache (see the module docstring).

    Args:
        q: (Tq, Hq, D) fp16 / bf16 / fp32 / fp64, any strides.
        k_cache, v_cache: (num_blocks, block_size, Hkv, D) of q's dtype, any strides (a cache
            whose last dim is not contiguous is copied first); Hq a multiple of Hkv.
        block_table: (B, max_blocks_per_seq) int32 physical block ids per sequence.
        cu_seqlens_q: (B + 1,) int32 offsets of each sequence's rows in q.
        seqlens_k: (B,) int32 key counts, the new rows included (already written to the cache).
        scale: softmax scale, default 1 / sqrt(D).
        max_seqlen_q: the longest Lq (sizes the Triton grid); computed when omitted.
        validate: False skips the checks that read the metadata's values (one device sync on
            CUDA): the caller vouches for lengths and block ids. Shapes and dtypes are always checked.
        backend: "auto" (the dispatcher: C++ on CPU, Triton on CUDA; the reference without the
            compiled library or under reference_ops()), "reference", or "triton" (the Triton
            kernel directly; on CPU tensors under TRITON_INTERPRET=1).

    Returns:
        (Tq, Hq, D) contiguous, q's dtype. Not differentiable.

    Raises:
        ValueError: naming the argument and the problem.
    """
    if not isinstance(q, torch.Tensor):
        _fail(f"q must be a tensor (Tq, Hq, D), got {_describe(q)}")
    _check_shapes(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k)
    if backend not in ("auto", "reference", "triton"):
        _fail(f"unknown backend {backend!r} (auto, reference, triton)")
    longest = _check_values(q, k_cache, block_table, cu_seqlens_q, seqlens_k) if validate else None
    if max_seqlen_q is None:
        max_seqlen_q = longest if longest is not None else int(cu_seqlens_q.diff().max()) if seqlens_k.numel() else 0
    elif longest is not None and max_seqlen_q < longest:
        _fail(f"max_seqlen_q {max_seqlen_q} is shorter than a sequence's {longest} query rows")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_table, cu_seqlens_q, seqlens_k = (x.to(torch.int32) for x in (block_table, cu_seqlens_q, seqlens_k))
    if backend == "auto" and reference_active():
        backend = "reference"
    if backend == "reference":
        return _paged_attention_reference(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale
        )
    if backend == "triton":
        if q.dtype == torch.float64 or q.shape[-1] > 256:
            _fail(f"backend 'triton' supports fp16/bf16/fp32 and head dims <= 256, got {q.dtype}, D={q.shape[-1]}")
        from eagle_fast.triton_kernels.attention.paged import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale)
    return torch.ops.eagle_fast.paged_attention(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, scale
    )
