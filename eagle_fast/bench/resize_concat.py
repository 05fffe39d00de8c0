"""Benchmark of resize_concat on Eagle's real fusion shapes (B=2, grid 32):

  X5: CLIP tokens (B, 576, 1024) 24x24, ConvNeXt (B, 3072, 32, 32), SAM (B, 256, 64, 64) with
      pixel_unshuffle 2, EVA (B, 1024, 64, 64), Pix2Struct (B, 1536, 45, 45) -> (B, 1024, 7680)
  X4: the same without SAM                                                -> (B, 1024, 6656)

Providers side by side: the eager reference (the original: F.interpolate + flatten + transpose per
expert, torch.cat) and this op, forward, backward and forward+backward, fp32 and bf16, median of
interleaved rounds. Peak extra memory = the peak allocated during one forward+backward beyond the
inputs, the output and the input gradients, measured in a fresh process (CUDA: the allocator's peak;
CPU: glibc's bytes in use, sampled by a thread every ~0.2 ms, so very short spikes may be missed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from eagle_fast.bench.harness import Row, publish, time_interleaved_ms
from eagle_fast.ops.resize_concat import resize_concat

SHAPES = {
    "x5": (
        [("tok", 1024, 24), ("map", 3072, 32), ("map", 256, 64), ("map", 1024, 64), ("map", 1536, 45)],
        [1, 1, 2, 1, 1],
    ),
    "x4": ([("tok", 1024, 24), ("map", 3072, 32), ("map", 1024, 64), ("map", 1536, 45)], [1, 1, 1, 1]),
}


@dataclass
class ResizeConcatBenchConfig:
    batch: int = 2
    grid: int = 32
    repeats: int = 7
    threads: int = 2
    device: str = "cpu"
    out_dir: str = "bench_results"
    memory: bool = True


def make_features(name: str, batch: int, dtype: torch.dtype, device: str) -> tuple[list[torch.Tensor], list[int]]:
    shapes, unshuffle = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    feats = []
    for kind, c, side in shapes:
        shape = (batch, side * side, c) if kind == "tok" else (batch, c, side, side)
        feats.append(torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True))
    return feats, unshuffle


def _step_fns(feats, unshuffle, grid, backend):
    out_holder = {}

    def fwd():
        with torch.no_grad():
            return resize_concat(feats, grid, unshuffle, backend=backend)

    def fwd_for_bwd():
        out_holder["out"] = resize_concat(feats, grid, unshuffle, backend=backend)

    grad = None

    def bwd():
        nonlocal grad
        out = out_holder["out"]
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, feats, grad, retain_graph=True)

    def fwd_bwd():
        out = resize_concat(feats, grid, unshuffle, backend=backend)
        torch.autograd.grad(out, feats, torch.ones_like(out))

    fwd_for_bwd()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _malloc_in_use() -> int:
    """Bytes the C allocator has handed out now (glibc mallinfo2: arena + mmapped blocks)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _memory_probe(name: str, batch: int, grid: int, dtype: str, backend: str, device: str) -> dict:
    """One forward+backward in this (fresh) process; returns bytes of peak extra memory. On CPU a
    thread samples the allocator's bytes in use every ~0.2 ms (short-lived spikes can be missed)."""
    import threading
    import time

    dt = getattr(torch, dtype)
    feats, unshuffle = make_features(name, batch, dt, device)
    channels = sum((f.shape[-1] if f.dim() == 3 else f.shape[1] * u * u) for f, u in zip(feats, unshuffle))
    grad_out = torch.ones(batch, grid * grid, channels, dtype=dt, device=device)
    out_bytes = grad_out.numel() * grad_out.element_size()
    grad_bytes = sum(f.numel() * f.element_size() for f in feats)
    # Warm up on a tiny problem first: the autograd engine, thread pools and kernel caches allocate
    # once per process, which is not the op's memory.
    tiny = [torch.randn(1, 2, 4, 4, dtype=dt, device=device, requires_grad=True)]
    torch.autograd.grad(resize_concat(tiny, 2, backend=backend).sum(), tiny)
    peak, stop = [0], threading.Event()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _malloc_in_use()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _malloc_in_use())
                time.sleep(0.0002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    out = resize_concat(feats, grid, unshuffle, backend=backend)
    grads = torch.autograd.grad(out, feats, grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        sampler.join()
        used = max(peak[0], _malloc_in_use()) - base
    del grads
    return {"extra_bytes": max(used - out_bytes - grad_bytes, 0), "out_bytes": out_bytes}


def _probe_subprocess(name, cfg: ResizeConcatBenchConfig, dtype: str, backend: str) -> dict:
    code = (
        f"import json; from eagle_fast.bench.resize_concat import _memory_probe; "
        f"print(json.dumps(_memory_probe({name!r}, {cfg.batch}, {cfg.grid}, {dtype!r}, {backend!r}, "
        f"{cfg.device!r})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(cfg: ResizeConcatBenchConfig) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    rows: list[Row] = []
    for name in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            feats, unshuffle = make_features(name, cfg.batch, dtype, cfg.device)
            fns = {}
            for provider, backend in (("eager reference", "reference"), ("eagle_fast", "auto")):
                for step, fn in _step_fns(feats, unshuffle, cfg.grid, backend).items():
                    fns[(provider, step)] = fn
            times = time_interleaved_ms(fns, repeats=cfg.repeats, cuda=cfg.device == "cuda")
            dt = str(dtype).removeprefix("torch.")
            for (provider, step), ms in times.items():
                extra = {"step": step}
                if step == "fwd+bwd" and cfg.memory:
                    backend = "reference" if provider == "eager reference" else "auto"
                    extra.update(_probe_subprocess(name, cfg, dt, backend))
                rows.append(
                    Row("resize_concat", f"{provider} {step}", cfg.device, dt, cfg.threads, name, ms, 1e3 / ms, extra)
                )
    return rows


def report(rows: list[Row]) -> str:
    ref = {(r.shape, r.dtype, r.extra["step"]): r.median_ms for r in rows if r.provider.startswith("eager")}
    lines = [
        "| shapes | dtype | step | eager ms | eagle_fast ms | speed-up | extra memory eager / eagle_fast (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    mem = {(r.shape, r.dtype, r.provider.split()[0]): r.extra.get("extra_bytes") for r in rows}
    for r in rows:
        if r.provider.startswith("eager"):
            continue
        step = r.extra["step"]
        e = ref[(r.shape, r.dtype, step)]
        m = "-"
        if step == "fwd+bwd" and None not in (
            mem.get((r.shape, r.dtype, "eagle_fast")),
            mem.get((r.shape, r.dtype, "eager")),
        ):  # no probes: "-"
            m = f"{mem[(r.shape, r.dtype, 'eager')] / 1e6:.1f} / {mem[(r.shape, r.dtype, 'eagle_fast')] / 1e6:.1f}"
        lines.append(f"| {r.shape} | {r.dtype} | {step} | {e:.2f} | {r.median_ms:.2f} | {e / r.median_ms:.2f}x | {m} |")
    return "\n".join(lines)


def main(cfg: ResizeConcatBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(
        rows,
        report(rows),
        cfg.out_dir,
        "resize_concat",
        f"resize_concat (B={cfg.batch})",
        machine_note=f", threads={cfg.threads}",
    )
    return rows
