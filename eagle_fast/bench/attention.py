"""Benchmark of attention: flash-attention's sweep, side by side in one run.

On CUDA: head dim 64 and 128 at a model width of 2048 (H = 2048 / D); (B, S) in (32, 512),
(16, 1k), (8, 2k), (4, 4k), (2, 8k), (1, 16k); causal off and on; forward, backward and
forward + backward; providers eagle_fast (the dispatcher: Triton), PyTorch's
scaled_dot_product_attention, and the flash-attn package when it is installed. TFLOP/s with
flash-attention's convention: FLOPs = 4 B S^2 H D (halved when causal), backward = 2.5x forward.

On CPU (no GPU): a reduced sweep at width 256 (H = 256 / D) with (B, S) in (4, 256), (2, 512),
(1, 1024): eagle_fast (its CPU kernel), sdpa and the fp32 math reference, so the script and its
report are exercised everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eagle_fast.bench.harness import Row, publish, time_interleaved_ms
from eagle_fast.ops.attention import _attention_reference, attention

GPU_SHAPES = ((32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384))
CPU_SHAPES = ((4, 256), (2, 512), (1, 1024))
MODES = ("fwd", "bwd", "fwd_bwd")


def _batch_by_seq(text: str) -> tuple[int, int]:
    """ "8x2048" -> (8, 2048): one (batch, sequence) point of the sweep."""
    b, sep, s = text.lower().partition("x")
    if not sep:
        raise ValueError(f"{text!r}: expected BATCHxSEQUENCE, e.g. 8x2048")
    return int(b), int(s)


@dataclass
class AttentionBenchConfig:
    device: str = field(
        default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu",
        metadata={"help": "cpu or cuda (default: cuda when available)"},
    )
    dtype: str = field(default="bfloat16", metadata={"choices": ("bfloat16", "float16", "float32")})
    head_dims: tuple[int, ...] = (64, 128)
    causal: tuple[bool, ...] = field(default=(False, True), metadata={"help": "causal settings to sweep"})
    shapes: tuple[tuple[int, int], ...] | None = field(
        default=None,
        metadata={"parse": _batch_by_seq, "help": "BATCHxSEQUENCE points, e.g. 8x2048 (default: the device's sweep)"},
    )
    width: int | None = field(default=None, metadata={"help": "model width H * D (default: 2048 on CUDA, 256 on CPU)"})
    repeats: int = 7
    threads: int = 2
    out_dir: str = "bench_results"


def flops(batch: int, seq: int, heads: int, d: int, causal: bool, mode: str) -> float:
    """flash-attention's convention: 4 B S^2 H D forward (halved when causal); backward 2.5x."""
    f = 4.0 * batch * seq * seq * heads * d / (2.0 if causal else 1.0)
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def _providers(device: str) -> dict:
    """name -> fn(q, k, v, causal) on (B, S, H, D) inputs, the layout the models hold; sdpa reads
    them through (B, H, S, D) transposed views, so no provider pays for a copy."""
    provs = {
        "eagle_fast": lambda q, k, v, c: attention(q, k, v, causal=c),
        # SDPA in its own (B, H, S, D) layout; the transposes are views
        "sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=c
        ),
    }
    if device == "cpu":
        provs["math reference"] = lambda q, k, v, c: _attention_reference(q, k, v, c, q.shape[-1] ** -0.5)
    else:
        try:
            from flash_attn import flash_attn_func

            provs["flash-attn"] = lambda q, k, v, c: flash_attn_func(q, k, v, causal=c)
        except ImportError:
            pass
    return provs


def _step_fns(fn, q, k, v, causal):
    """fwd, bwd (backward of a retained graph) and fwd_bwd callables for one provider."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, causal)
    dout = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, causal)

    def bwd():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)

    def fwd_bwd():
        o = fn(*leaves, causal)
        return torch.autograd.grad(o, leaves, dout)

    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd_bwd}


def run(cfg: AttentionBenchConfig) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    cuda = cfg.device == "cuda"
    shapes = cfg.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    width = cfg.width or (2048 if cuda else 256)
    rows: list[Row] = []
    for d in cfg.head_dims:
        heads = width // d
        for batch, seq in shapes:
            g = torch.Generator(cfg.device).manual_seed(0)
            q, k, v = (torch.randn(batch, seq, heads, d, device=cfg.device, dtype=dtype, generator=g) for _ in range(3))
            for causal in cfg.causal:
                fns = {}
                for name, fn in _providers(cfg.device).items():
                    for mode, step in _step_fns(fn, q, k, v, causal).items():
                        fns[(name, mode)] = step
                for (name, mode), ms in time_interleaved_ms(fns, repeats=cfg.repeats, cuda=cuda).items():
                    tflops = flops(batch, seq, heads, d, causal, mode) / ms / 1e9
                    rows.append(
                        Row(
                            "attention",
                            name,
                            cfg.device,
                            cfg.dtype,
                            cfg.threads,
                            f"B{batch} S{seq} H{heads} D{d}{' causal' if causal else ''}",
                            ms,
                            tflops,
                            {"mode": mode},
                        )
                    )
                del fns
    return rows


def report(rows: list[Row]) -> str:
    sdpa = {(r.shape, r.extra["mode"]): r.median_ms for r in rows if r.provider == "sdpa"}
    lines = ["| shape | mode | provider | ms | TFLOP/s | vs sdpa |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = sdpa[(r.shape, r.extra["mode"])] / r.median_ms
        lines.append(
            f"| {r.shape} | {r.extra['mode']} | {r.provider} | {r.median_ms:.3f} | {r.items_per_s:.3f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main(cfg: AttentionBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(
        rows,
        report(rows),
        cfg.out_dir,
        "attention",
        f"attention {cfg.dtype}",
        machine_note=f", threads={cfg.threads}",
        ylabel="TFLOP/s (higher is better)",
        label=lambda r: f"{r.provider} {r.extra['mode']}\n{r.shape}",
    )
    return rows
