"""Benchmark of training steps: the tiny-X5 recipe's model on the built-in easy-VQA data, the fast
path (compiled and flash kernels) against the same model on every op's pure-torch reference
(`reference_ops()`), side by side: samples/s and tokens/s of full optimizer steps (forward,
backward, AdamW) on fixed, pre-collated batches.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from eagle_fast.bench.harness import Row, publish, time_interleaved_ms
from eagle_fast.ops import reference_ops


@dataclass
class TrainBenchConfig:
    recipe: str = "tiny-x5"
    batch_size: int = 8
    batches: int = 4
    repeats: int = 5
    threads: int = 2
    out_dir: str = "bench_results"


def run(cfg: TrainBenchConfig) -> list[Row]:
    from eagle_fast.train.config import recipe
    from eagle_fast.train.loop import param_groups
    from eagle_fast.train.setup import build_data, build_model, build_tokenizer

    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = recipe(cfg.recipe, "sft", output_dir=os.path.join(tmp, "run"))
        tok = build_tokenizer(tcfg)
        torch.manual_seed(0)
        model, proc = build_model(tcfg, tok)
        data = build_data(tcfg, tok, proc, model)
        from eagle_fast.data import EagleCollator

        collate = EagleCollator(tok.pad_token_id)
        batches = [collate([data[i] for i in range(k * cfg.batch_size, (k + 1) * cfg.batch_size)])
                   for k in range(cfg.batches)]
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=1e-4)
    tokens = sum(int(b["attention_mask"].sum()) + 16 * int(b["images"]["pixel_values"].shape[0]) for b in batches)

    def steps(reference: bool):
        def fn():
            with reference_ops(reference):
                for b in batches:
                    out = model(b["input_ids"], b["attention_mask"], labels=b["labels"], images=b["images"])
                    out.loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        return fn

    times = time_interleaved_ms({"eagle_fast": steps(False), "reference ops": steps(True)}, repeats=cfg.repeats)
    n = cfg.batches * cfg.batch_size
    return [Row("train", name, "cpu", "float32", cfg.threads, f"{cfg.recipe} B{cfg.batch_size}", ms, n / ms * 1e3,
                {"tokens_per_s": round(tokens / ms * 1e3, 1)}) for name, ms in times.items()]


def report(rows: list[Row]) -> str:
    ref = next(r for r in rows if r.provider == "reference ops")
    lines = ["| path | samples/s | tokens/s | vs reference |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.provider} | {r.items_per_s:.2f} | {r.extra['tokens_per_s']} | "
                     f"{ref.median_ms / r.median_ms:.2f}x |")
    return "\n".join(lines)


def main(cfg: TrainBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(rows, report(rows), cfg.out_dir, "train", f"{cfg.recipe} training steps",
            machine_note=f", threads={cfg.threads}")
    return rows
