"""Benchmark of multi-turn chat latency: time to first token (TTFT) of turn 1 (experts + prefill),
of turn 2 with the conversation's KV prefix reused and with everything re-encoded, and decode
tokens/s, on a tiny and a mid-size preset (random weights: latency does not depend on them).

Each repeat runs a fresh conversation; the two turn-2 variants alternate within a repeat so drift
in the machine's speed hits both alike. Greedy decoding with stop ids off: every reply has exactly
`reply_tokens` tokens.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from eagle_fast.bench.harness import Row, publish


@dataclass
class ChatBenchConfig:
    presets: tuple[str, ...] = ("eagle-tiny-x5", "eagle-small-x5")
    reply_tokens: int = 16
    repeats: int = 5
    threads: int = 2
    out_dir: str = "bench_results"


def _first_token_ms(stream) -> tuple[float, float, int]:
    """(ms to the first delta, ms for the rest, tokens after the first) of a ChatSession stream."""
    t0 = time.perf_counter()
    next(stream)
    t1 = time.perf_counter()
    rest = sum(1 for _ in stream)
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, rest


def _session(model, tok, proc, cfg: ChatBenchConfig, reuse: bool):
    from eagle_fast.inference import ChatSession

    return ChatSession(
        model, tok, proc, reuse_prefix=reuse, max_new_tokens=cfg.reply_tokens, temperature=0, stop_ids=(), stop=()
    )


def run_preset(preset: str, cfg: ChatBenchConfig) -> list[Row]:
    from eagle_fast.inference import load_model

    torch.manual_seed(0)
    model, tok, proc = load_model(preset, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    q1, q2 = "What is in this image? Describe it in detail.", "And what colour is it?"
    turn1, decode_tps, reuse, fresh = [], [], [], []
    for rep in range(cfg.repeats + 1):  # the first round warms up allocators and kernels
        chats = {True: _session(model, tok, proc, cfg, True), False: _session(model, tok, proc, cfg, False)}
        for use, chat in chats.items():
            ms, rest_ms, n = _first_token_ms(chat.send(q1, images=[image], stream=True))
            if rep and use:
                turn1.append(ms)
                decode_tps.append(n / rest_ms * 1e3)
        order = (True, False) if rep % 2 else (False, True)
        for use in order:
            ms = _first_token_ms(chats[use].send(q2, stream=True))[0]
            if rep:
                (reuse if use else fresh).append(ms)
    rows_seen = len(chats[True]._prompt())
    grid2 = model.config.mm_grid**2
    shape = f"{preset} prompt~{rows_seen - 1 + grid2} rows"
    med = {
        k: statistics.median(v) for k, v in (("turn 1", turn1), ("turn 2 reuse", reuse), ("turn 2 re-encode", fresh))
    }
    rows = [Row("chat", k, "cpu", "float32", cfg.threads, shape, ms, 1e3 / ms) for k, ms in med.items()]
    rows.append(
        Row(
            "chat",
            "decode",
            "cpu",
            "float32",
            cfg.threads,
            shape,
            1e3 / statistics.median(decode_tps),
            statistics.median(decode_tps),
        )
    )
    return rows


def report(rows: list[Row]) -> str:
    lines = [
        "| preset | TTFT turn 1 (ms) | TTFT turn 2, re-encode (ms) | TTFT turn 2, prefix reuse (ms) | "
        "reuse speed-up | decode tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(r.shape for r in rows):
        by = {r.provider: r for r in rows if r.shape == shape}
        lines.append(
            f"| {shape} | {by['turn 1'].median_ms:.1f} | {by['turn 2 re-encode'].median_ms:.1f} | "
            f"{by['turn 2 reuse'].median_ms:.1f} | "
            f"{by['turn 2 re-encode'].median_ms / by['turn 2 reuse'].median_ms:.1f}x | "
            f"{by['decode'].items_per_s:.1f} |"
        )
    return "\n".join(lines)


def main(cfg: ChatBenchConfig) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    rows = [r for p in cfg.presets for r in run_preset(p, cfg)]
    publish(
        rows,
        report(rows),
        cfg.out_dir,
        "chat",
        "chat latency (1 / ms; decode: tokens/s)",
        machine_note=f", threads={cfg.threads}",
        ylabel="1 / ms, tokens/s (higher is better)",
        label=lambda r: f"{r.shape.split()[0]}\n{r.provider}",
    )
    return rows
