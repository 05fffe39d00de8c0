"""python -m eagle_fast.bench BENCH [options], BENCH one of preprocess, resize_concat, attention, paged_attention,
linear_cross_entropy, train, chat, serve, all; each subcommand has --help, its flags the fields of its config
dataclass. `all` runs every benchmark with its defaults and writes OUT/results.csv (every row) beside each benchmark's
own CSV and PNG; serve (two servers under load, long on a CPU at its defaults) runs in `all --quick` only, at
pipeline-check settings."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from eagle_fast.cli import ConfigParser

# subcommand -> (module under eagle_fast.bench, its config dataclass, help, aliases)
BENCHES = {
    "preprocess": (
        "fused_preprocess",
        "PreprocessBenchConfig",
        "X5 image preprocessing fan-out",
        ("fused_preprocess",),
    ),
    "resize_concat": (
        "resize_concat",
        "ResizeConcatBenchConfig",
        "channel-concat fusion of expert maps, forward and backward",
        (),
    ),
    "attention": (
        "attention",
        "AttentionBenchConfig",
        "flash attention sweep: eagle_fast vs sdpa (vs flash-attn when installed)",
        (),
    ),
    "paged_attention": (
        "paged_attention",
        "PagedAttentionBenchConfig",
        "decode step against a paged KV cache: eagle_fast vs gather + sdpa",
        (),
    ),
    "linear_cross_entropy": (
        "linear_cross_entropy",
        "LinearCrossEntropyBenchConfig",
        "LM head + causal-LM loss, forward and forward+backward",
        (),
    ),
    "train": ("train", "TrainBenchConfig", "training steps: eagle_fast against plain transformers", ()),
    "chat": ("chat", "ChatBenchConfig", "multi-turn chat: TTFT with and without KV prefix reuse, decode tokens/s", ()),
    "serve": (
        "serve",
        "ServeBenchConfig",
        "HTTP load on the server: batch vs sequential scheduler, tokens/s, "
        "TTFT, inter-token latency, against a compute-bound ideal",
        (),
    ),
}


@dataclass
class AllBenchConfig:
    out_dir: str = field(default="bench", metadata={"help": "OUT: results.csv and every benchmark's CSV and PNG"})
    threads: int = 2
    quick: bool = field(default=False, metadata={"help": "one repeat of the smallest settings (a pipeline check)"})


def _module(name: str):
    return importlib.import_module(f"eagle_fast.bench.{BENCHES[name][0]}")


def parser() -> ConfigParser:
    p = ConfigParser("python -m eagle_fast.bench", __doc__)
    sub = p.add_subparsers(dest="bench", required=True)
    for name, (_, config, help_text, aliases) in BENCHES.items():
        one = sub.add_parser(name, aliases=list(aliases), help=help_text, description=help_text)
        one.add_config(getattr(_module(name), config))
    every = sub.add_parser("all", help=AllBenchConfig.__doc__ or "every benchmark with its defaults")
    every.add_config(AllBenchConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    given = parser().parse_given(argv)
    name = given.pop("bench")
    if name == "all":
        return run_all(AllBenchConfig(**given))
    name = next(n for n, spec in BENCHES.items() if name == n or name in spec[3])
    module = _module(name)
    module.main(getattr(module, BENCHES[name][1])(**given))
    return 0


def run_all(cfg: AllBenchConfig) -> int:
    """Every benchmark with its defaults (quick: one repeat of the smallest settings, to check the
    pipeline) -> each one's CSV and PNG, and OUT/results.csv with all rows of this run. The serve
    benchmark runs with quick only: at its defaults it takes long on a CPU; run it on its own."""
    import os

    from eagle_fast.bench import (
        attention,
        chat,
        fused_preprocess,
        linear_cross_entropy,
        paged_attention,
        resize_concat,
        serve,
        train,
    )
    from eagle_fast.bench.harness import write_csv

    out_dir, threads, quick = cfg.out_dir, cfg.threads, cfg.quick
    dev = "cuda" if _cuda() else "cpu"
    q = dict(repeats=1) if quick else {}
    rows = []
    rows += fused_preprocess.main(
        fused_preprocess.PreprocessBenchConfig(
            threads=(threads,) if quick else (1, threads),
            out_dir=out_dir,
            **q,
            **(dict(min_sample_ms=1.0) if quick else {}),
        )
    )
    rows += resize_concat.main(
        resize_concat.ResizeConcatBenchConfig(
            threads=threads, out_dir=out_dir, device=dev, **q, **(dict(grid=8, memory=False) if quick else {})
        )
    )
    rows += attention.main(
        attention.AttentionBenchConfig(
            device=dev,
            threads=threads,
            dtype="bfloat16" if dev == "cuda" else "float32",
            out_dir=out_dir,
            **q,
            **(dict(head_dims=(32,), causal=(True,), shapes=((1, 64),), width=64) if quick else {}),
        )
    )
    rows += paged_attention.main(
        paged_attention.PagedAttentionBenchConfig(
            device=dev,
            threads=threads,
            out_dir=out_dir,
            **q,
            **(dict(batches=(2,), context=64, min_sample_ms=1.0) if quick else {}),
        )
    )
    rows += linear_cross_entropy.main(
        linear_cross_entropy.LinearCrossEntropyBenchConfig(
            threads=threads,
            out_dir=out_dir,
            device=dev,
            dtype="bfloat16" if dev == "cuda" else "float32",
            **q,
            **(dict(shapes=("small",)) if quick else {}),
        )
    )
    rows += train.main(
        train.TrainBenchConfig(
            threads=threads,
            out_dir=out_dir,
            **q,
            **(dict(presets=("eagle-tiny-x5",), batch_size=2, batches=1) if quick else {}),
        )
    )
    rows += chat.main(
        chat.ChatBenchConfig(
            threads=threads, out_dir=out_dir, **q, **(dict(presets=("eagle-tiny-x5",), reply_tokens=2) if quick else {})
        )
    )
    if quick:
        rows += serve.main(
            serve.ServeBenchConfig(
                model="eagle-tiny-x5",
                concurrency=(1, 2),
                max_tokens=4,
                patterns=("burst",),
                image_size=64,
                threads=threads,
                out_dir=out_dir,
                prefill_repeats=1,
                decode_steps=2,
            )
        )
    path = os.path.join(out_dir, "results.csv")
    if os.path.exists(path):
        os.remove(path)  # this run's rows only; the per-benchmark CSVs keep the history
    write_csv(rows, path)
    print(f"wrote {path} ({len(rows)} rows)")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
