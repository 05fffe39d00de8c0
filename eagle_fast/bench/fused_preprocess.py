"""Benchmark of fused_preprocess: the X5 fan-out (1024 canvas, CLIP 336, Pix2Struct 2048 patches)
on real photos, side by side:

  (a) reference pipeline: PIL expand-to-square -> HF CLIPImageProcessorPil -> F.interpolate to 336
      -> HF Pix2StructImageProcessorPil on the de-normalized canvas (what the original runs)
  (b) the same fan-out with HF's torchvision-backed processors
  (c) eagle_fast's pure-torch reference
  (d) eagle_fast's C++ kernel
  GPU (when present): (e) the CUDA kernel, (f) the Triton kernel, on uint8 images already on device.

Images are processed one call each, as a data loader does; providers are timed in interleaved
rounds (median per provider). Reported: images/s, ratios, and the output bandwidth of (d) against
a measured memcpy bandwidth.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from eagle_fast.bench.harness import Row, memcpy_gbps, publish, time_interleaved_ms
from eagle_fast.ops.fused_preprocess import CLIP_MEAN, CLIP_STD, PAD_FILL, fused_preprocess


@dataclass
class PreprocessBenchConfig:
    threads: tuple[int, ...] = (1, 2)
    repeats: int = 7
    out_dir: str = "bench_results"
    gpu_batch: int = 32
    min_sample_ms: float = 200.0  # each timed sample: calls back to back for at least this long


def _photos() -> list[np.ndarray]:
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.array(Image.open(f).convert("RGB"))
    return [a.copy() for a in load_sample_images().images] + [hopper]


def _hf_pipeline(fast: bool):
    from PIL import Image
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil
    from transformers.models.pix2struct.image_processing_pix2struct import Pix2StructImageProcessor

    kw = dict(size={"shortest_edge": 1024}, crop_size={"height": 1024, "width": 1024})
    clip_proc = CLIPImageProcessor(**kw) if fast else CLIPImageProcessorPil(**kw)
    p2s_proc = Pix2StructImageProcessor() if fast else Pix2StructImageProcessorPil()
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)

    def run(img: np.ndarray):
        im = Image.fromarray(img)
        w, h = im.size
        side = max(w, h)
        sq = Image.new("RGB", (side, side), PAD_FILL)
        sq.paste(im, ((side - w) // 2, (side - h) // 2))
        pv = clip_proc(sq, return_tensors="pt")["pixel_values"]
        clip = F.interpolate(pv, size=(336, 336), mode="bilinear", align_corners=True)
        p2s = p2s_proc((pv[0] * std + mean) * 255, return_tensors="pt", input_data_format="channels_first")
        return pv, clip, p2s

    return run


def _out_bytes(dtype: torch.dtype) -> int:
    elems = 3 * 1024 * 1024 + 3 * 336 * 336 + 2048 * 770 + 2048
    return elems * torch.finfo(dtype).bits // 8


def run(cfg: PreprocessBenchConfig) -> list[Row]:
    photos = _photos()
    tensors = [torch.from_numpy(p) for p in photos]
    n = len(photos)
    shape = "+".join(f"{p.shape[1]}x{p.shape[0]}" for p in photos)
    rows: list[Row] = []

    def add(provider, ms, dtype, threads, device="cpu", items=n, **extra):
        rows.append(
            Row(
                "preprocess",
                provider,
                device,
                str(dtype).removeprefix("torch."),
                threads,
                shape,
                ms,
                items / ms * 1e3,
                extra,
            )
        )

    pil_run, tv_run = _hf_pipeline(fast=False), _hf_pipeline(fast=True)
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        copy_gbps = memcpy_gbps(threads)
        fns = {
            ("(a) HF PIL pipeline", torch.float32): lambda: [pil_run(p) for p in photos],
            ("(b) HF torchvision pipeline", torch.float32): lambda: [tv_run(p) for p in photos],
        }
        for dtype in (torch.float32, torch.bfloat16):
            fns[("(c) eagle_fast reference", dtype)] = functools.partial(
                lambda d: [fused_preprocess([t], dtype=d, backend="reference") for t in tensors], dtype
            )
            fns[("(d) eagle_fast C++", dtype)] = functools.partial(
                lambda d: [fused_preprocess([t], dtype=d) for t in tensors], dtype
            )
        for (provider, dtype), ms in time_interleaved_ms(
            fns, repeats=cfg.repeats, min_sample_ms=cfg.min_sample_ms
        ).items():
            add(provider, ms, dtype, threads)
            if provider.startswith("(d)"):
                rows[-1].extra.update(
                    out_gbps=round(n * _out_bytes(dtype) / ms / 1e6, 2), memcpy_gbps=round(copy_gbps, 2)
                )

    if torch.cuda.is_available():
        torch.set_num_threads(max(cfg.threads))
        batch = [tensors[i % n].cuda() for i in range(cfg.gpu_batch)]
        fns = {}
        for dtype in (torch.float32, torch.bfloat16):
            for provider, backend in (("(e) eagle_fast CUDA", "auto"), ("(f) eagle_fast Triton", "triton")):
                fns[(provider, dtype)] = functools.partial(
                    lambda d, be: fused_preprocess(batch, dtype=d, backend=be), dtype, backend
                )
        gpu_copy = memcpy_gbps(1, device="cuda")
        for (provider, dtype), ms in time_interleaved_ms(
            fns, repeats=cfg.repeats, cuda=True, min_sample_ms=cfg.min_sample_ms
        ).items():
            add(
                provider,
                ms,
                dtype,
                max(cfg.threads),
                device="cuda",
                items=cfg.gpu_batch,
                out_gbps=round(cfg.gpu_batch * _out_bytes(dtype) / ms / 1e6, 1),
                memcpy_gbps=round(gpu_copy, 1),
            )
    return rows


def report(rows: list[Row]) -> str:
    base = {(r.provider[:3], r.threads): r.items_per_s for r in rows if r.dtype == "float32"}
    lines = [
        "| provider | device | dtype | threads | images/s | vs (a) | vs (b) | out GB/s (memcpy GB/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = base.get(("(a)", r.threads)), base.get(("(b)", r.threads))
        va = f"{r.items_per_s / a:.1f}x" if a else "-"
        vb = f"{r.items_per_s / b:.1f}x" if b else "-"
        bw = f"{r.extra['out_gbps']} ({r.extra['memcpy_gbps']})" if "out_gbps" in r.extra else "-"
        lines.append(
            f"| {r.provider} | {r.device} | {r.dtype} | {r.threads} | {r.items_per_s:.1f} | {va} | {vb} | {bw} |"
        )
    return "\n".join(lines)


def main(cfg: PreprocessBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(rows, report(rows), cfg.out_dir, "preprocess", "X5 preprocessing fan-out")
    return rows
