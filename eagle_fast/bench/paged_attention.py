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


def gather_sdpa(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k):
    """Per sequence: its blocks gathered into contiguous (Lk, Hkv, D) K/V, then SDPA with GQA (a
    decode row sees every key: no mask)."""
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, (lk, a, e) in enumerate(zip(seqlens_k.tolist(), cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:])):
        blocks = block_table[b, : (lk + bs - 1) // bs]
        k, v = (_gather(c, blocks, lk).transpose(0, 1)[None] for c in (k_cache, v_cache))
        out[a:e] = F.scaled_dot_product_attention(q[a:e].transpose(0, 1)[None], k, v, enable_gqa=True)[0].transpose(
            0, 1
        )
    return out


def _providers(max_q: int, scale: float) -> dict:
    return {
        "eagle_fast": lambda *a: paged_attention(*a),
        "eagle_fast unchecked": lambda *a: paged_attention(*a, validate=False, max_seqlen_q=max_q),
        "gather+sdpa": gather_sdpa,
        "reference": lambda *a: _paged_attention_reference(*a, max_q, scale),
    }


def run(cfg: PagedAttentionBenchConfig) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    hq, hkv, d = heads(cfg.preset)
    rows: list[Row] = []
    for batch in cfg.batches:
        step = make_step(batch, cfg.context, cfg.block_size, hq, hkv, d, dtype, cfg.device)
        kv_bytes = int(step[5].sum()) * hkv * d * 2 * step[1].element_size()
        provs = _providers(1, d**-0.5)
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
        shape = f"B{batch} ctx~{cfg.context} bs{cfg.block_size} Hq{hq} Hkv{hkv} D{d}"
        for name, ms in times.items():
            rows.append(
                Row(
                    "paged_attention",
                    name,
                    cfg.device,
                    cfg.dtype,
                    cfg.threads,
                    shape,
                    ms,
                    kv_bytes / ms / 1e6,
                    {"kv_bytes": kv_bytes, "preset": cfg.preset},
                )
            )
    return rows


def report(rows: list[Row]) -> str:
    base = {r.shape: r.median_ms for r in rows if r.provider == "gather+sdpa"}
    lines = ["| step | provider | ms | KV GB/s | speed vs gather+sdpa |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.provider} | {r.median_ms:.3f} | {r.items_per_s:.2f} | "
            f"{base[r.shape] / r.median_ms:.2f}x |"
        )
    return "\n".join(lines)


def main(cfg: PagedAttentionBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(
        rows,
        report(rows),
        cfg.out_dir,
        "paged_attention",
        f"paged_attention decode {cfg.dtype}",
        machine_note=f", threads={cfg.threads}",
        ylabel="KV GB/s read (higher is better)",
        label=lambda r: f"{r.provider}\n{r.shape.split(' ')[0]}",
    )
    return rows
