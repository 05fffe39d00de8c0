"""paged_attention: the dispatcher's kernel (C++ on CPU; the reference under
EAGLE_FAST_DISABLE_COMPILED=1), the Triton kernel (under the interpreter here, compiled on a GPU) and
the pure-torch reference, against an independent dense formulation: each sequence's keys and values
as they were written into the cache, run through F.scaled_dot_product_attention with the
bottom-right causal mask. Low precision follows flash-attention's rule: error vs fp64 <= 2x the
error of PyTorch's own SDPA in the same dtype."""

import math

import pytest
import torch
import torch.nn.functional as F

from eagle_fast.ops import has_compiled_ops, reference_ops
from eagle_fast.ops.paged_attention import _paged_attention_reference, paged_attention

IMPLS = ("auto", "triton", "reference")


def _build(lq, lk, bs, hq, hkv, d, dtype=torch.float32, seed=0, shuffle=True, share=None, spare=3):
    """A batch written into a paged cache as an engine would: returns (q, k_cache, v_cache,
    block_table, cu_seqlens_q, seqlens_k, keys, values) with keys[b] / values[b] (Lk, Hkv, D) the
    sequence's rows in order. Unused cache slots hold NaN (a kernel reading them fails the test),
    block_table rows are padded with -1, physical blocks are shuffled unless shuffle=False.
    share=(src, dst, n): sequence dst's first n blocks ARE sequence src's (a shared prefix)."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lk]
    values = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lk]
    q = torch.randn(sum(lq), hq, d, generator=g).to(dtype)
    need = [-(-n // bs) for n in lk]
    shared = 0
    if share is not None:
        src, dst, n = share
        assert n * bs <= min(lk[src], lk[dst])
        keys[dst][: n * bs], values[dst][: n * bs] = keys[src][: n * bs], values[src][: n * bs]
        shared = n
    total = sum(need) - shared + spare
    order = torch.randperm(total, generator=g).tolist() if shuffle else list(range(total))
    k_cache = torch.full((total, bs, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.full((len(lk), max(need, default=0) + 1), -1, dtype=torch.int32)
    for b, n in enumerate(lk):
        for p in range(need[b]):
            if share is not None and b == share[1] and p < share[2]:
                table[b, p] = table[share[0], p]  # the same physical block, not a copy
                continue
            blk = order.pop()
            table[b, p] = blk
            rows = slice(p * bs, min(n, (p + 1) * bs))
            k_cache[blk, : rows.stop - rows.start] = keys[b][rows]
            v_cache[blk, : rows.stop - rows.start] = values[b][rows]
    cu = torch.tensor([0] + lq).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, table, cu, torch.tensor(lk, dtype=torch.int32), keys, values


def _dense_sdpa(q, keys, values, cu, scale=None, dtype=None):
    """Independent formulation: per sequence, SDPA over its contiguous K/V with query row i seeing
    keys j <= i + Lk - Lq; in `dtype` (default: the inputs')."""
    cu = cu.tolist()
    out = torch.empty(q.shape, dtype=dtype or q.dtype)
    for b, (k, v) in enumerate(zip(keys, values)):
        a, e = cu[b], cu[b + 1]
        if e == a:
            continue
        lq, lk = e - a, k.shape[0]
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        qs, ks, vs = (x.to(dtype or x.dtype).transpose(0, 1)[None] for x in (q[a:e], k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[a:e] = o[0].transpose(0, 1)
    return out


def _run(impl, q, k_cache, v_cache, table, cu, lk, **kw):
    return paged_attention(q, k_cache, v_cache, table, cu, lk, backend=impl, **kw)


def _assert_two_x_rule(impl, case, atol=1e-6):
    q, kc, vc, table, cu, lk, keys, values = case
    got = _run(impl, q, kc, vc, table, cu, lk)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    dense64 = _dense_sdpa(q, keys, values, cu, dtype=torch.float64)
    ref64 = _paged_attention_reference(
        q.double(), kc.double(), vc.double(), table, cu, lk, 0, 1 / math.sqrt(q.shape[-1])
    )
    assert (ref64 - dense64).abs().max() <= 1e-12  # the two oracles agree
    sdpa_err = (_dense_sdpa(q, keys, values, cu).double() - dense64).abs().max().item()
    for name, want in (("dense", dense64), ("reference", ref64)):
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * sdpa_err + atol, f"{impl} {q.dtype} vs {name}: error {err:.3g} > 2 x SDPA's {sdpa_err:.3g}"


# (Lq per sequence, Lk per sequence, block_size, Hq, Hkv, D): decode steps (Lq = 1) mixed with
# prefill chunks after a cached prefix (1 < Lq < Lk), whole prompts (Lq = Lk) and an empty slot.
# The C++ kernel runs sequences of 8 new rows or more with D a multiple of 16 (not fp64) on its
# tiled path (items of 64 rows x one kv head, keys in steps of 64), the others on its row path.
CASES = {
    "mixed_bs16_gqa3": ([1, 1, 7, 1, 20, 0], [1, 45, 30, 70, 20, 5], 16, 6, 2, 64),
    "bs1_mha_d32": ([1, 3, 1], [13, 3, 70], 1, 4, 4, 32),
    "bs3_gqa3_d80": ([5, 1, 16, 1], [17, 1, 40, 64], 3, 9, 3, 80),
    "long_chunk_mqa": ([33], [70], 16, 2, 1, 64),
    # a decode batch of many sequences: the C++ kernel's items then take every kv head of a sequence
    "decode_batch_gqa3": ([1] * 11 + [4], [9, 130, 64, 1, 17, 16, 33, 200, 48, 5, 77, 40], 16, 9, 3, 64),
    # tiled: 45 rows (135 query vectors: not a multiple of the 4-vector blocks) after 255 cached
    # keys (several key steps, the first unmasked), 8 rows = 8 keys (the threshold, a causal
    # square), 7 rows (row path), a decode row and a 100-row square (two row tiles); blocks of 5 rows
    "prompt_chunks_tiled_d128": ([45, 8, 7, 1, 100], [300, 8, 90, 66, 100], 5, 9, 3, 128),
    "prompt_chunk_tiled_d16_mqa": ([70], [200], 16, 4, 1, 16),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_sdpa_within_two_x_pytorch_error(impl, dtype, case):
    _assert_two_x_rule(impl, _build(*CASES[case], dtype=dtype))


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_within_1e_12(impl, case):
    q, kc, vc, table, cu, lk, keys, values = _build(*CASES[case], dtype=torch.float64, seed=1)
    got = _run(impl, q, kc, vc, table, cu, lk)
    assert got.dtype == torch.float64
    assert (got - _dense_sdpa(q, keys, values, cu)).abs().max() <= 1e-12


def test_hand_computed_values():
    """q = 0: every visible key scores 0, so each row is the plain mean of the values it sees.
    Keys 0..2 of one sequence (block_size 2) sit in physical blocks [1, 0] (out of order):
    v0 = (1, 2), v1 = (3, 4) in block 1; v2 = (5, 7) in block 0, slot 0."""
    v_cache = torch.tensor(
        [[[[5.0, 7.0]], [[float("nan"), float("nan")]]], [[[1.0, 2.0]], [[3.0, 4.0]]]]
    )  # (2 blocks, 2 slots, 1 head, 2)
    k_cache = torch.ones(2, 2, 1, 2)
    k_cache[0, 1] = float("nan")  # the unused slot
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    lk = torch.tensor([3], dtype=torch.int32)
    for impl in IMPLS:
        # prefill chunk of Lq = 2 new rows (keys 1, 2): row 0 sees keys 0..1, row 1 sees 0..2
        out = _run(impl, torch.zeros(2, 1, 2), k_cache, v_cache, table, torch.tensor([0, 2], dtype=torch.int32), lk)
        want = torch.tensor([[[(1 + 3) / 2, (2 + 4) / 2]], [[(1 + 3 + 5) / 3, (2 + 4 + 7) / 3]]])
        assert torch.allclose(out, want, atol=1e-6), impl
        # decode step (Lq = 1): sees all three keys
        out = _run(impl, torch.zeros(1, 1, 2), k_cache, v_cache, table, torch.tensor([0, 1], dtype=torch.int32), lk)
        assert torch.allclose(out, want[1:], atol=1e-6), impl
    # a score gap of 50 (q . k * scale) leaves exp(-50) ~ 2e-22 to the other keys: the top key's value
    q = torch.tensor([[[100.0, 0.0]]])
    # block 1 holds keys 0 = (0, 1) and 1 = (1, 0), block 0 key 2 = (0, 0): scores 0, 50, 0
    keys = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])
    for impl in IMPLS:
        out = _run(impl, q, keys, v_cache, table, torch.tensor([0, 1], dtype=torch.int32), lk, scale=0.5)
        assert torch.allclose(out, torch.tensor([[[3.0, 4.0]]]), atol=1e-6), impl  # v1


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_shared_blocks(impl):
    """Sequences 0 and 2 share their first 3 physical blocks (a common prompt prefix)."""
    case = _build([1, 4, 9], [52, 20, 61], 16, 6, 2, 64, dtype=torch.bfloat16, share=(0, 2, 3), seed=2)
    table = case[3]
    assert torch.equal(table[0, :3], table[2, :3])
    _assert_two_x_rule(impl, case)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_block_order_and_batch_do_not_change_bits(impl):
    """The output depends on each sequence's logical rows only: shuffled or in-order blocks, alone
    or in a batch, give the same bits."""
    args = ([1, 10, 1], [37, 40, 9], 3, 6, 2, 32)  # the 10-row chunk on the C++ kernel's tiled path
    shuffled, ordered = _build(*args, seed=4), _build(*args, seed=4, shuffle=False)
    assert not torch.equal(shuffled[3], ordered[3])
    a, b = _run(impl, *shuffled[:6]), _run(impl, *ordered[:6])
    assert torch.equal(a, b)
    q, kc, vc, table, cu, lk = shuffled[:6]
    alone = _run(impl, q[1:11], kc, vc, table[1:2], torch.tensor([0, 10], dtype=torch.int32), lk[1:2])
    assert torch.equal(alone, a[1:11])


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_strided_q_and_caches(impl):
    """q as a (Hq, Tq, D) transpose and with a strided last dim; caches as views into one
    (num_blocks, 2, block_size, Hkv, D) K/V buffer and in head-major (num_blocks, Hkv, block_size,
    D) memory: all read through their strides."""
    q, kc, vc, table, cu, lk, keys, values = _build([1, 5, 12], [20, 33, 64], 16, 6, 2, 64, seed=5)
    want = _run("reference", q, kc, vc, table, cu, lk)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    q_s = torch.stack([q, torch.zeros_like(q)], -1).flatten(-2)[..., ::2]
    kv = torch.stack([kc, vc], 1)  # (num_blocks, 2, block_size, Hkv, D)
    head_major = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (kc, vc)]
    assert not (q_t.is_contiguous() or q_s.is_contiguous() or kv[:, 0].is_contiguous() or head_major[0].is_contiguous())
    for qq, k, v in ((q_t, kc, vc), (q_s, kc, vc), (q, kv[:, 0], kv[:, 1]), (q, *head_major)):
        got = _run(impl, qq, k, v, table, cu, lk)
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.skipif(not has_compiled_ops(), reason="the C++ kernel is not loaded")
def test_cpu_kernel_same_bits_for_any_thread_count():
    """The row path's items split by kv head when (sequence, row tile) items are fewer than 4 per
    thread and take every head otherwise: this batch (5 tiles of 16 rows) takes the first at 2
    threads, the second at 1. The tiled path's items (the 16- and 40-row chunks) go to whichever
    thread is free. Neither changes the bits."""
    case = _build([16, 1, 40], [30, 70, 40], 16, 9, 3, 64, dtype=torch.bfloat16, seed=6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("auto", *case[:6])
        torch.set_num_threads(2)
        two = _run("auto", *case[:6])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.skipif(not has_compiled_ops(), reason="the C++ kernel is not loaded")
def test_cpu_kernel_registered_and_guards_direct_calls():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("eagle_fast::paged_attention", "CPU")
    q, kc, vc, table, cu, lk = _build([2], [9], 4, 2, 1, 32)[:6]
    table[0, 1] = 99  # past the cache: the op refuses rather than reading outside it
    with pytest.raises(RuntimeError, match="block_table holds block 99"):
        torch.ops.eagle_fast.paged_attention(q, kc, vc, table, cu, lk, 2, 0.1)


def test_reference_ops_context_and_validate_false():
    case = _build([1, 3], [10, 30], 16, 4, 2, 32, seed=7)
    want = _run("reference", *case[:6])
    with reference_ops():
        assert torch.equal(_run("auto", *case[:6]), want)
    assert torch.allclose(_run("auto", *case[:6], validate=False, max_seqlen_q=3), want, atol=1e-5)


def test_opcheck():
    args = _build([1, 5, 2], [9, 21, 2], 4, 6, 2, 32, seed=8)[:6]
    torch.library.opcheck(
        torch.ops.eagle_fast.paged_attention.default,
        (*args, 5, 0.2),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def _bad_inputs():
    """(what is wrong, the error's text): every failure names the argument."""

    def mutate(**changes):
        q, kc, vc, table, cu, lk = _build([1, 3], [10, 5], 4, 4, 2, 32, seed=9)[:6]
        args = dict(q=q, k_cache=kc, v_cache=vc, block_table=table, cu_seqlens_q=cu, seqlens_k=lk)
        for k, f in changes.items():
            args[k] = f(args[k])
        return args

    bad_lengths = torch.tensor([10, 2], dtype=torch.int32)
    return [
        (mutate(q=lambda x: x[0]), "q must be a 3-D tensor"),
        (mutate(k_cache=lambda x: x.half()), "k_cache has dtype torch.float16, q has torch.float32"),
        (mutate(v_cache=lambda x: x[:, :2]), "v_cache .* differ in shape"),
        (mutate(q=lambda x: x[:, :3]), "q's 3 heads are not a multiple of k_cache's 2 kv heads"),
        (mutate(q=lambda x: x[..., :16]), "head dim of q \\(16\\) and k_cache \\(32\\) differ"),
        (mutate(block_table=lambda x: x.float()), "block_table must hold int32"),
        (mutate(block_table=lambda x: x.to("meta")), "block_table is on meta, q on cpu"),
        (mutate(cu_seqlens_q=lambda x: x[:2]), "cu_seqlens_q has 2 offsets, seqlens_k has 2 sequences"),
        (mutate(cu_seqlens_q=lambda x: torch.tensor([0, 3, 5], dtype=torch.int32)), "cu_seqlens_q must rise from 0"),
        (mutate(seqlens_k=lambda x: bad_lengths), "sequence 1: seqlens_k 2 < its 3 query rows"),
        (mutate(seqlens_k=lambda x: torch.tensor([10, 17], dtype=torch.int32)), "sequence 1: seqlens_k 17 exceeds"),
        (
            mutate(block_table=lambda x: x.index_fill(1, torch.tensor([1]), 99)),
            "sequence 0: block_table holds block 99",
        ),
        (mutate(block_table=lambda x: x.index_fill(1, torch.tensor([0]), -1)), "block_table holds block -1"),
    ]


@pytest.mark.parametrize("i", range(13))
def test_bad_inputs_raise_value_error_naming_the_argument(i):
    args, message = _bad_inputs()[i]
    with pytest.raises(ValueError, match=message):
        paged_attention(**args)


def test_bad_options():
    q, kc, vc, table, cu, lk = _build([1, 3], [10, 5], 4, 4, 2, 32)[:6]
    with pytest.raises(ValueError, match="max_seqlen_q 2 is shorter than a sequence's 3 query rows"):
        paged_attention(q, kc, vc, table, cu, lk, max_seqlen_q=2)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        paged_attention(q, kc, vc, table, cu, lk, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' supports fp16/bf16/fp32"):
        paged_attention(q.double(), kc.double(), vc.double(), table, cu, lk, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_triton_kernel(dtype, case):
    """On a GPU: the dispatcher's CUDA kernel (compiled Triton) against the CPU oracles."""
    q, kc, vc, table, cu, lk, keys, values = _build(*CASES[case], dtype=dtype)
    got = paged_attention(*(x.cuda() for x in (q, kc, vc, table, cu, lk))).cpu()
    dense64 = _dense_sdpa(q, keys, values, cu, dtype=torch.float64)
    sdpa_err = (_dense_sdpa(q, keys, values, cu).double() - dense64).abs().max().item()
    assert (got.double() - dense64).abs().max().item() <= 2 * sdpa_err + 1e-5
