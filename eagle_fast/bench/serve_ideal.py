"""The compute-bound ideal of `python -m eagle_fast.bench serve` (see its module docstring), measured
in-process on a BatchEngine with the benchmark's model, prompt and image size: no HTTP, no event loop."""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING

import torch

from eagle_fast.bench.serve_load import synthetic_image

if TYPE_CHECKING:
    from eagle_fast.bench.serve import ServeBenchConfig


def ideal_tokens_per_s(concurrency: int, tokens: float, prefill_s: float, step_s: float) -> float:
    """c * N / (c * prefill_s + N * step_s(c)): c prefills in series, then N decode steps of batch c."""
    return concurrency * tokens / (concurrency * prefill_s + tokens * step_s)


def measure_compute(cfg: ServeBenchConfig) -> dict:
    """prefill_s and step_s[c] (see the module docstring), in this process, then the model freed."""
    from eagle_fast.data.tokenize import IMAGE_TOKEN
    from eagle_fast.images import to_rgb_batch
    from eagle_fast.inference import BatchEngine, EngineConfig, GenerationConfig, load_model
    from eagle_fast.inference.session import prompt_ids

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model, tok, proc = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    ids = prompt_ids(cfg.template, [("user", IMAGE_TOKEN + "\n" + cfg.prompt)], tok)
    engine = BatchEngine(
        model,
        tok,
        EngineConfig(
            max_num_seqs=max(cfg.concurrency),
            max_batched_tokens=cfg.max_batched_tokens,
            kv_cache_bytes=cfg.kv_cache_bytes,
            encoder_cache_bytes=cfg.encoder_cache_bytes,
        ),
    )

    def first_token_s(k: int) -> float:
        events: list = []
        t0 = time.perf_counter()  # preprocessing is part of every request's cost, as in the server
        images = proc(to_rgb_batch([synthetic_image(k, cfg.image_size)]), device=model.device)
        engine.submit(ids, images, GenerationConfig(max_new_tokens=1, temperature=0, stop_ids=()), events.append)
        while not events:
            engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        while engine.has_work():  # the request ends at its one token; nothing else runs
            engine.step()
        return dt

    first_token_s(10**6)  # warm-up (an image used by no request)
    base = 10**6 + 1
    if cfg.same_image:
        first_token_s(base)  # cold: the image and prompt enter the caches
        prefill = [first_token_s(base) for _ in range(cfg.prefill_repeats)]
    else:
        prefill = [first_token_s(base + i) for i in range(cfg.prefill_repeats)]
    out = {"prefill_s": statistics.median(prefill), "step_s": {}}
    for c in sorted(set(cfg.concurrency)):
        events: list[list] = [[] for _ in range(c)]
        # the first admitted decode while the others prefill (~3 steps each): room for those tokens
        gen = GenerationConfig(max_new_tokens=cfg.decode_steps + 4 * c + 64, temperature=0, stop_ids=(), stop=())
        # images of their own (numbered apart from the prefill ones): c prompts' K/V, as under load
        first = 1 if cfg.same_image else 2 * 10**6 + 100 * c
        pixels = [
            proc(
                to_rgb_batch([synthetic_image(first + (0 if cfg.same_image else i), cfg.image_size)]),
                device=model.device,
            )
            for i in range(c)
        ]
        seqs = [engine.submit(ids, px, gen, e.append) for px, e in zip(pixels, events)]
        while not all(events):
            engine.step()
        before = [len(e) for e in events]
        t0 = time.perf_counter()
        for _ in range(cfg.decode_steps):
            engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        out["step_s"][c] = (time.perf_counter() - t0) / cfg.decode_steps
        gained = [len(e) - b for e, b in zip(events, before)]
        if gained != [cfg.decode_steps] * c:
            raise RuntimeError(
                f"decode steps at batch {c}: every sequence should gain {cfg.decode_steps} tokens, got {gained}"
            )
        for s in seqs:
            engine.cancel(s)
        while engine.has_work():
            engine.step()
    engine = model = pixels = None  # freed before the servers start
    gc.collect()
    return out
