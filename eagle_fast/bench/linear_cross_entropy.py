"""Benchmark of linear_cross_entropy (LM head + causal-LM loss), forward and forward+backward.

Shapes (N positions of hidden size H, vocabulary V, a fraction of the positions learned):
  tiny-x5:  V 32000, H 64, N 2048, 8 % learned   (the tiny-X5 recipe's batch of 8: answers only)
  smollm2:  V 49152, H 576, N 512, 25 % learned  (SmolLM2-135M's tied head)
  (CUDA adds N 8192 for both; "small", V 4096 H 64 N 256, runs only when named: bench all --quick.)

Providers side by side, median of interleaved rounds: the eager reference (what the model did:
F.linear over every position, logits upcast to fp32, F.cross_entropy(reduction="sum") / n) and
eagle_fast (learned rows gathered, then the chunked fused op). `extra` carries the bytes of fp32
logits the reference materializes and those of one chunk of the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eagle_fast.bench.harness import Row, publish, time_interleaved_ms
from eagle_fast.ops.linear_cross_entropy import _CHUNK_BYTES, linear_cross_entropy

SHAPES = {  # name: (V, H, N, learned fraction)
    "tiny-x5": (32000, 64, 2048, 0.08),
    "smollm2": (49152, 576, 512, 0.25),
}
CUDA_SHAPES = {"tiny-x5 N8192": (32000, 64, 8192, 0.08), "smollm2 N8192": (49152, 576, 8192, 0.25)}
NAMED_ONLY = {"small": (4096, 64, 256, 0.25)}  # run only when named (bench all --quick)


@dataclass
class LinearCrossEntropyBenchConfig:
    repeats: int = 5
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    shapes: tuple[str, ...] | None = None  # names of SHAPES (and CUDA_SHAPES); None: every one for the device
    out_dir: str = "bench_results"


def make_problem(V: int, H: int, N: int, learned: float, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) >= learned] = -100
    return hidden, weight, labels.to(device)


def _step_fns(hidden, weight, labels, backend):
    def fwd():
        with torch.no_grad():
            return linear_cross_entropy(hidden, weight, labels, shift=False, backend=backend)

    def fwd_bwd():
        loss = linear_cross_entropy(hidden, weight, labels, shift=False, backend=backend)
        torch.autograd.grad(loss, (hidden, weight))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _shapes(cfg: LinearCrossEntropyBenchConfig) -> dict[str, tuple[int, int, int, float]]:
    every = {**SHAPES, **(CUDA_SHAPES if cfg.device == "cuda" else {})}
    if cfg.shapes is None:
        return every
    known = {**SHAPES, **CUDA_SHAPES, **NAMED_ONLY}
    unknown = [s for s in cfg.shapes if s not in known]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known: {', '.join(known)}")
    return {s: known[s] for s in cfg.shapes}


def run(cfg: LinearCrossEntropyBenchConfig) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    rows: list[Row] = []
    for name, (V, H, N, learned) in _shapes(cfg).items():
        hidden, weight, labels = make_problem(V, H, N, learned, dtype, cfg.device)
        n = int((labels != -100).sum())
        fns = {}
        for provider, backend in (("eager reference", "reference"), ("eagle_fast", "auto")):
            for step, fn in _step_fns(hidden, weight, labels, backend).items():
                fns[(provider, step)] = fn
        times = time_interleaved_ms(fns, repeats=cfg.repeats, cuda=cfg.device == "cuda")
        chunk_rows = max(1, _CHUNK_BYTES.get(cfg.device, 16 << 20) // (4 * V))
        for (provider, step), ms in times.items():
            extra = {"step": step, "learned_rows": n, "ref_logits_bytes": N * V * 4,
                     "chunk_bytes": min(chunk_rows, n) * V * 4}
            rows.append(Row("linear_cross_entropy", f"{provider} {step}", cfg.device, cfg.dtype, cfg.threads,
                            f"{name} V{V} H{H} N{N}", ms, N / ms * 1e3, extra))
    return rows


def report(rows: list[Row]) -> str:
    ref = {(r.shape, r.extra["step"]): r.median_ms for r in rows if r.provider.startswith("eager")}
    lines = ["| shape | learned rows | step | eager ms | eagle_fast ms | speed-up | fp32 logits eager / chunk (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.provider.startswith("eager"):
            continue
        e = ref[(r.shape, r.extra["step"])]
        mem = f"{r.extra['ref_logits_bytes'] / 1e6:.0f} / {r.extra['chunk_bytes'] / 1e6:.1f}"
        lines.append(f"| {r.shape} | {r.extra['learned_rows']} | {r.extra['step']} | {e:.2f} | {r.median_ms:.2f} | "
                     f"{e / r.median_ms:.2f}x | {mem} |")
    return "\n".join(lines)


def main(cfg: LinearCrossEntropyBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(rows, report(rows), cfg.out_dir, "linear_cross_entropy", f"linear_cross_entropy ({cfg.dtype})",
            machine_note=f", threads={cfg.threads}")
    return rows
