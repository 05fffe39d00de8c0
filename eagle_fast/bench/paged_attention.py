"""Benchmark of paged_attention: one decode step against a paged KV cache, side by side in one run.

A batch of B sequences (B = 1, 4, 16 by default), each with one new query row and ~1,100 cached
rows (context +- 32, so the sequences differ, the new row included), in a cache of 16-row blocks
scattered in shuffled order, as a continuous-batching engine leaves them. Heads from a model
preset (eagle-small-x5's LLM, SmolLM2-135M: 9 query heads, 3 kv heads, head dim 64). Providers:

  eagle_fast              the op through the dispatcher (C++ on CPU, Triton on CUDA), with its
                          argument checks (which read the metadata: a sync on CUDA)
  eagle_fast unchecked    the same op, validate=False and max_seqlen_q given (what an engine
                          that owns its metadata calls)
  gather+sdpa             what runs without the op: per sequence, gather its blocks into
                          contiguous K/V and call F.scaled_dot_product_attention (GQA)
  reference               the op's pure-torch reference (gather, fp32 softmax by einsum)

Reported: ms per step and the KV bytes a step must read (sum of Lk * Hkv * D * 2 * itemsize) per
second. The decode step is bound by that read.

Prompt chunks (`--chunks`, default one of 512 rows after `--chunk_prefix` 512 cached rows: the
middle chunk of a ~1,100-row image prompt under the engine's default 512-row steps) are reported
apart (paged_attention_prefill.{csv,png}) in GFLOP/s of the causal product (4 * D * Hq * the
keys each row sees), with one more provider:

  gather+flash            the blocks gathered, then `ops.attention` (PyTorch's CPU flash kernel with
                          the bottom-right causal mask; the Triton kernel on CUDA)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eagle_fast.bench.harness import Row, publish, time_interleaved_ms
from eagle_fast.ops.paged_attention import _gather, _paged_attention_reference, paged_attention


@dataclass
class PagedAttentionBenchConfig:
    device: str = field(
        default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu",
        metadata={"help": "cpu or cuda (default: cuda when available)"},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "choices": ("float32", "bfloat16", "float16"),
            "help": "dtype of q and the cache (default: bfloat16 on CUDA, float32 on CPU)",
        },
    )
    preset: str = field(default="eagle-small-x5", metadata={"help": "model preset whose LLM heads are used"})
    batches: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "sequences per decode step"})
    context: int = field(default=1100, metadata={"help": "keys per sequence (+- 32), the new row included"})
    block_size: int = 16
    chunks: tuple[int, ...] = field(default=(512,), metadata={"help": "prompt chunk rows (one sequence each)"})
    chunk_prefix: int = field(default=512, metadata={"help": "cached keys before each prompt chunk"})
    repeats: int = field(default=15, metadata={"help": "timed rounds, median reported"})
    min_sample_ms: float = field(default=20.0, metadata={"help": "a timed sample repeats the call at least this long"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    out_dir: str = field(default="bench_results", metadata={"help": "where paged_attention.csv and .png go"})

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"


def heads(preset: str) -> tuple[int, int, int]:
    """(Hq, Hkv, D) of the preset's LLM."""
    from eagle_fast.model.presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    hq, hkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return hq, hkv, cfg["hidden_size"] // hq


def make_step(
    batch: int, context: int, block_size: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0
):
    """(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k) of one decode step: Lq = 1 per
    sequence, Lk = context + ((37 b) mod 64) - 32, blocks shuffled over the cache."""
    g = torch.Generator().manual_seed(seed)
    lk = [max(1, context + (37 * b) % 64 - 32) for b in range(batch)]
    need = [-(-n // block_size) for n in lk]
    order = torch.randperm(sum(need), generator=g)
    table = torch.zeros(batch, max(need), dtype=torch.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = order[start : start + n]
        start += n
    k_cache = torch.randn(sum(need), block_size, hkv, d, generator=g).to(device=device, dtype=dtype)
    v_cache = torch.randn(sum(need), block_size, hkv, d, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(batch, hq, d, generator=g).to(device=device, dtype=dtype)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    return q, k_cache, v_cache, table.to(device), cu.to(device), torch.tensor(lk, dtype=torch.int32, device=device)


def make_chunk(rows: int, prefix: int, block_size: int, hq: int, hkv: int, d: int, dtype, device: str, seed: int = 0):
    """The step inputs of one sequence's prompt chunk: Lq = rows new rows after `prefix` cached ones."""
    # make_step's sequence 0 has context - 32 keys: the cache of exactly prefix + rows rows
    q, k_cache, v_cache, table, _, _ = make_step(1, prefix + rows + 32, block_size, hq, hkv, d, dtype, device, seed)
    q = torch.randn(rows, hq, d, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    cu = torch.tensor([0, rows], dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, cu, torch.tensor([prefix + rows], dtype=torch.int32, device=device)


def _gathered(k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k):
    """Per sequence: (first row, end row, K, V) with its blocks gathered into contiguous (Lk, Hkv, D)."""
    bs = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    for b, lk in enumerate(seqlens_k.tolist()):
        blocks = block_table[b, : (lk + bs - 1) // bs]
        yield cu[b], cu[b + 1], _gather(k_cache, blocks, lk), _gather(v_cache, blocks, lk)


def gather_sdpa(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k):
    """Per sequence: its blocks gathered, then SDPA with GQA (a decode row sees every key: no mask;
    a chunk of several rows gets the bottom-right causal mask)."""
    out = torch.empty_like(q)
    for a, e, k, v in _gathered(k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k):
        lq, lk = e - a, k.shape[0]
        i, j = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
        mask = None if lq == 1 else j <= i + (lk - lq)
        o = F.scaled_dot_product_attention(
            q[a:e].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, enable_gqa=True
        )
        out[a:e] = o[0].transpose(0, 1)
    return out


def gather_flash(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k):
    """Per sequence: its blocks gathered, then ops.attention (bottom-right causal)."""
    from eagle_fast.ops.attention import attention

    out = torch.empty_like(q)
    for a, e, k, v in _gathered(k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k):
        out[a:e] = attention(q[None, a:e], k[None], v[None], causal=True)[0]
    return out


def _providers(max_q: int, scale: float) -> dict:
    provs = {
        "eagle_fast": lambda *a: paged_attention(*a),
        "eagle_fast unchecked": lambda *a: paged_attention(*a, validate=False, max_seqlen_q=max_q),
        "gather+sdpa": gather_sdpa,
        "gather+flash": gather_flash,
        "reference": lambda *a: _paged_attention_reference(*a, max_q, scale),
    }
    if max_q == 1:
        del provs["gather+flash"]
    return provs


def run(cfg: PagedAttentionBenchConfig) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    hq, hkv, d = heads(cfg.preset)
    rows: list[Row] = []
    steps = [
        (f"B{b} ctx~{cfg.context}", make_step(b, cfg.context, cfg.block_size, hq, hkv, d, dtype, cfg.device))
        for b in cfg.batches
    ]
    steps += [
        (f"chunk{n}+{cfg.chunk_prefix}", make_chunk(n, cfg.chunk_prefix, cfg.block_size, hq, hkv, d, dtype, cfg.device))
        for n in cfg.chunks
    ]
    for label, step in steps:
        max_q = int(torch.diff(step[4]).max())
        lk = step[5].tolist()
        kv_bytes = sum(lk) * hkv * d * 2 * step[1].element_size()
        # causal product: each of a sequence's Lq rows sees Lk - Lq + 1 .. Lk keys
        seen = sum(n * (k - n + 1) + n * (n - 1) // 2 for n, k in zip(torch.diff(step[4]).tolist(), lk))
        flops = 4 * d * hq * seen
        provs = _providers(max_q, d**-0.5)
        with torch.no_grad():
            want = provs["reference"](*step).float()
            for name, fn in provs.items():  # every provider computes the same step
                err = (fn(*step).float() - want).abs().max().item()
                if err > (1e-4 if dtype == torch.float32 else 3e-2):
                    raise RuntimeError(f"paged_attention bench: {name} differs from the reference by {err:.3g}")
            times = time_interleaved_ms(
                {n: (lambda f=f: f(*step)) for n, f in provs.items()},
                repeats=cfg.repeats,
                cuda=cfg.device.startswith("cuda"),
                min_sample_ms=cfg.min_sample_ms,
            )
        shape = f"{label} bs{cfg.block_size} Hq{hq} Hkv{hkv} D{d}"
        chunk = max_q > 1
        for prov, ms in times.items():
            rows.append(
                Row(
                    "paged_attention_prefill" if chunk else "paged_attention",
                    prov,
                    cfg.device,
                    cfg.dtype,
                    cfg.threads,
                    shape,
                    ms,
                    flops / ms / 1e6 if chunk else kv_bytes / ms / 1e6,
                    {"kv_bytes": kv_bytes, "flops": flops, "preset": cfg.preset},
                )
            )
    return rows


def report(rows: list[Row], unit: str = "KV GB/s") -> str:
    base = {r.shape: r.median_ms for r in rows if r.provider == "gather+sdpa"}
    lines = [f"| step | provider | ms | {unit} | speed vs gather+sdpa |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.provider} | {r.median_ms:.3f} | {r.items_per_s:.2f} | "
            f"{base[r.shape] / r.median_ms:.2f}x |"
        )
    return "\n".join(lines)


def main(cfg: PagedAttentionBenchConfig) -> list[Row]:
    rows = run(cfg)
    for name, title, unit, ylabel in (
        ("paged_attention", "decode", "KV GB/s", "KV GB/s read (higher is better)"),
        ("paged_attention_prefill", "prompt chunk", "GFLOP/s", "causal GFLOP/s (higher is better)"),
    ):
        part = [r for r in rows if r.bench == name]
        if part:
            publish(
                part,
                report(part, unit),
                cfg.out_dir,
                name,
                f"paged_attention {title} {cfg.dtype}",
                machine_note=f", threads={cfg.threads}",
                ylabel=ylabel,
                label=lambda r: f"{r.provider}\n{r.shape.split(' ')[0]}",
            )
    return rows
