"""Benchmark of linear_cross_entropy (LM head + causal-LM loss), forward and forward+backward.

Shapes (N positions of hidden size H, vocabulary V, a fraction of the positions learned):
  tiny-x5:  V 32000, H 64, N 2048, 8 % learned   (the tiny-X5 recipe's batch of 8: answers only)
  smollm2:  V 49152, H 576, N 512, 25 % learned  (SmolLM2-135M's tied head)
  (CUDA adds N 8192 for both; "small", V 4096 H 64 N 256, runs only when named: bench all --quick.)

Providers side by side, median of interleaved rounds, every one on inputs of the bench's dtype
(bf16 rows against bf16 baselines; the loss itself is fp32 in all three, as transformers upcasts):
  eager reference     what the model did (transformers' ForCausalLMLoss): F.linear over all N rows,
                      logits upcast to fp32, F.cross_entropy(reduction="sum") / n;
  eager learned rows  what a careful user would write: the n learned rows gathered first, then
                      F.linear on them, logits upcast, F.cross_entropy(reduction="sum") / n;
  eagle_fast          the learned rows gathered, then the chunked fused op (logits never stored).
The report gives eagle_fast against each baseline, labelled. `extra` carries the bytes of fp32
logits each baseline materializes and those of one chunk of the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    repeats: int = field(default=5, metadata={"help": "timed rounds, median reported"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    device: str = field(
        default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu",
        metadata={"help": "cpu or cuda (default: cuda when available)"},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "choices": ("float32", "bfloat16", "float16"),
            "help": "dtype of hidden and weight for the op and both baselines (default: bfloat16 on CUDA, float32 on CPU)",
        },
    )

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"

    shapes: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "names of SHAPES (and CUDA_SHAPES, or 'small'); default: every one for the device"},
    )
    out_dir: str = field(default="bench_results", metadata={"help": "where linear_cross_entropy.csv and .png go"})


PROVIDERS = ("eager reference", "eager learned rows", "eagle_fast")
BASELINES = {
    "eager reference": "eager F.linear over all rows + F.cross_entropy",
    "eager learned rows": "eager F.linear over learned rows + F.cross_entropy",
}


def make_problem(V: int, H: int, N: int, learned: float, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) >= learned] = -100
    return hidden, weight, labels.to(device)


def learned_rows_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The eager baseline on the learned rows: hidden (N, H), weight (V, H), labels (N,) with -100 on
    unlearned rows -> sum of the n learned rows' cross entropy / n, logits (n, V) in the inputs'
    dtype, upcast to fp32 for the loss as transformers does."""
    rows = (labels != -100).nonzero().squeeze(1)  # (n,): a host sync, as the op's own gather
    logits = F.linear(hidden.index_select(0, rows), weight)  # (n, V)
    return F.cross_entropy(logits.float(), labels.index_select(0, rows), reduction="sum") / max(rows.numel(), 1)


def loss_fn(provider: str):
    """provider -> fn(hidden (N, H), weight (V, H), labels (N,) already aligned) -> 0-d fp32 loss."""
    if provider == "eager learned rows":
        return learned_rows_loss
    backend = {"eager reference": "reference", "eagle_fast": "auto"}[provider]
    return lambda h, w, y: linear_cross_entropy(h, w, y, shift=False, backend=backend)


def _step_fns(hidden, weight, labels, provider):
    loss = loss_fn(provider)

    def fwd():
        with torch.no_grad():
            return loss(hidden, weight, labels)

    def fwd_bwd():
        torch.autograd.grad(loss(hidden, weight, labels), (hidden, weight))

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
        for provider in PROVIDERS:
            for step, fn in _step_fns(hidden, weight, labels, provider).items():
                fns[(provider, step)] = fn
        times = time_interleaved_ms(fns, repeats=cfg.repeats, cuda=cfg.device == "cuda")
        chunk_rows = max(1, _CHUNK_BYTES.get(cfg.device, 16 << 20) // (4 * V))
        for (provider, step), ms in times.items():
            extra = {
                "step": step,
                "learned_rows": n,
                "ref_logits_bytes": N * V * 4,
                "learned_logits_bytes": n * V * 4,
                "chunk_bytes": min(chunk_rows, n) * V * 4,
                "baseline": BASELINES.get(provider, ""),
            }
            if provider == "eagle_fast":
                for base in BASELINES:
                    extra[f"x_vs_{base.replace(' ', '_')}"] = round(times[(base, step)] / ms, 3)
            rows.append(
                Row(
                    "linear_cross_entropy",
                    f"{provider} {step}",
                    cfg.device,
                    cfg.dtype,
                    cfg.threads,
                    f"{name} V{V} H{H} N{N}",
                    ms,
                    N / ms * 1e3,
                    extra,
                )
            )
    return rows


def report(rows: list[Row]) -> str:
    base = {(r.shape, r.extra["step"], r.provider.rsplit(" ", 1)[0]): r.median_ms for r in rows if r.extra["baseline"]}
    lines = [
        "| shape | dtype | learned rows | step | eager all rows ms | eager learned rows ms | eagle_fast ms | "
        "vs eager all rows | vs eager learned rows | fp32 logits all / learned / op chunk (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.extra["baseline"]:
            continue
        step = r.extra["step"]
        e_all, e_learned = base[(r.shape, step, "eager reference")], base[(r.shape, step, "eager learned rows")]
        mem = (
            f"{r.extra['ref_logits_bytes'] / 1e6:.0f} / {r.extra['learned_logits_bytes'] / 1e6:.1f} / "
            f"{r.extra['chunk_bytes'] / 1e6:.1f}"
        )
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.extra['learned_rows']} | {step} | {e_all:.2f} | {e_learned:.2f} | "
            f"{r.median_ms:.2f} | {e_all / r.median_ms:.2f}x | {e_learned / r.median_ms:.2f}x | {mem} |"
        )
    return "\n".join(lines)


def main(cfg: LinearCrossEntropyBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(
        rows,
        report(rows),
        cfg.out_dir,
        "linear_cross_entropy",
        f"linear_cross_entropy ({cfg.dtype})",
        machine_note=f", threads={cfg.threads}",
        ylabel="positions / s (higher is better)",
        label=lambda r: f"{r.shape.split(' V')[0]} {r.dtype}\n{r.provider}",
    )
    return rows
