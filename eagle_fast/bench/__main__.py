"""python -m eagle_fast.bench {preprocess,resize_concat,attention,linear_cross_entropy,train,chat,all} [options];
each subcommand has --help. `all` runs every benchmark with its defaults and writes OUT/results.csv (every row) beside
each benchmark's own CSV and PNG."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eagle_fast.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    pre = sub.add_parser("preprocess", aliases=["fused_preprocess"], help="X5 image preprocessing fan-out")
    pre.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    pre.add_argument("--repeats", type=int, default=7)
    pre.add_argument("--out-dir", default="bench_results")
    pre.add_argument("--gpu-batch", type=int, default=32)
    pre.add_argument("--min-sample-ms", type=float, default=200.0,
                     help="each timed sample repeats a provider's calls for at least this long")
    rc = sub.add_parser("resize_concat", help="channel-concat fusion of expert maps, forward and backward")
    rc.add_argument("--threads", type=int, default=2)
    rc.add_argument("--repeats", type=int, default=7)
    rc.add_argument("--batch", type=int, default=2)
    rc.add_argument("--device", default="cpu")
    rc.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    rc.add_argument("--out-dir", default="bench_results")
    at = sub.add_parser("attention", help="flash attention sweep: eagle_fast vs sdpa (vs flash-attn when installed)")
    at.add_argument("--device", default="cuda" if _cuda() else "cpu")
    at.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    at.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    at.add_argument("--causal", choices=["both", "on", "off"], default="both")
    at.add_argument("--shapes", nargs="+", default=None, metavar="BxS",
                    help="batch x sequence pairs, e.g. 8x2048 (default: the device's sweep)")
    at.add_argument("--width", type=int, default=None, help="model width H*D (default: 2048 on CUDA, 256 on CPU)")
    at.add_argument("--repeats", type=int, default=7)
    at.add_argument("--threads", type=int, default=2)
    at.add_argument("--out-dir", default="bench_results")
    lce = sub.add_parser("linear_cross_entropy", help="LM head + causal-LM loss, forward and forward+backward")
    lce.add_argument("--threads", type=int, default=2)
    lce.add_argument("--repeats", type=int, default=5)
    lce.add_argument("--device", default="cuda" if _cuda() else "cpu")
    lce.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on CUDA, float32 on CPU")
    lce.add_argument("--shapes", nargs="+", default=None, help="names of the shape sets (default: all of the device)")
    lce.add_argument("--out-dir", default="bench_results")
    tr = sub.add_parser("train", help="tiny-recipe training steps: fast path vs reference ops")
    tr.add_argument("--recipe", default="tiny-x5")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--batches", type=int, default=4)
    tr.add_argument("--repeats", type=int, default=5)
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--out-dir", default="bench_results")
    ch = sub.add_parser("chat", help="multi-turn chat: TTFT with and without KV prefix reuse, decode tokens/s")
    ch.add_argument("--presets", nargs="+", default=["eagle-tiny-x5", "eagle-small-x5"])
    ch.add_argument("--reply-tokens", type=int, default=16)
    ch.add_argument("--repeats", type=int, default=5)
    ch.add_argument("--threads", type=int, default=2)
    ch.add_argument("--out-dir", default="bench_results")
    al = sub.add_parser("all", help="every benchmark with its defaults -> OUT/results.csv + a PNG per benchmark")
    al.add_argument("--out-dir", default="bench")
    al.add_argument("--threads", type=int, default=2)
    al.add_argument("--quick", action="store_true", help="one repeat of the smallest settings (a pipeline check)")
    args = parser.parse_args(argv)
    if args.bench == "all":
        return run_all(args.out_dir, args.threads, args.quick)

    if args.bench in ("preprocess", "fused_preprocess"):
        from eagle_fast.bench.fused_preprocess import PreprocessBenchConfig, main as run

        run(PreprocessBenchConfig(threads=tuple(args.threads), repeats=args.repeats, out_dir=args.out_dir,
                                  gpu_batch=args.gpu_batch, min_sample_ms=args.min_sample_ms))
    elif args.bench == "resize_concat":
        from eagle_fast.bench.resize_concat import ResizeConcatBenchConfig, main as run

        run(ResizeConcatBenchConfig(batch=args.batch, repeats=args.repeats, threads=args.threads, device=args.device,
                                    out_dir=args.out_dir, memory=not args.no_memory))
    elif args.bench == "attention":
        from eagle_fast.bench.attention import AttentionBenchConfig, main as run

        shapes = None if args.shapes is None else tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes)
        causal = {"both": (False, True), "on": (True,), "off": (False,)}[args.causal]
        run(AttentionBenchConfig(device=args.device, dtype=args.dtype, head_dims=tuple(args.head_dims), causal=causal,
                                 shapes=shapes, width=args.width, repeats=args.repeats, threads=args.threads,
                                 out_dir=args.out_dir))
    elif args.bench == "linear_cross_entropy":
        from eagle_fast.bench.linear_cross_entropy import LinearCrossEntropyBenchConfig, main as run

        dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        run(LinearCrossEntropyBenchConfig(repeats=args.repeats, threads=args.threads, device=args.device, dtype=dtype,
                                          shapes=None if args.shapes is None else tuple(args.shapes),
                                          out_dir=args.out_dir))
    elif args.bench == "train":
        from eagle_fast.bench.train import TrainBenchConfig, main as run

        run(TrainBenchConfig(recipe=args.recipe, batch_size=args.batch_size, batches=args.batches,
                             repeats=args.repeats, threads=args.threads, out_dir=args.out_dir))
    elif args.bench == "chat":
        from eagle_fast.bench.chat import ChatBenchConfig, main as run

        run(ChatBenchConfig(presets=tuple(args.presets), reply_tokens=args.reply_tokens, repeats=args.repeats,
                            threads=args.threads, out_dir=args.out_dir))
    return 0


def run_all(out_dir: str, threads: int, quick: bool = False) -> int:
    """Every benchmark with its defaults (quick: one repeat of the smallest settings, to check the
    pipeline) -> each one's CSV and PNG, and OUT/results.csv with all rows of this run."""
    import os

    from eagle_fast.bench import attention, chat, fused_preprocess, linear_cross_entropy, resize_concat, train
    from eagle_fast.bench.harness import write_csv

    dev = "cuda" if _cuda() else "cpu"
    q = dict(repeats=1) if quick else {}
    rows = []
    rows += fused_preprocess.main(fused_preprocess.PreprocessBenchConfig(
        threads=(threads,) if quick else (1, threads), out_dir=out_dir, **q, **(dict(min_sample_ms=1.0) if quick else {})))
    rows += resize_concat.main(resize_concat.ResizeConcatBenchConfig(
        threads=threads, out_dir=out_dir, device=dev, **q, **(dict(grid=8, memory=False) if quick else {})))
    rows += attention.main(attention.AttentionBenchConfig(
        device=dev, threads=threads, dtype="bfloat16" if dev == "cuda" else "float32", out_dir=out_dir, **q,
        **(dict(head_dims=(32,), causal=(True,), shapes=((1, 64),), width=64) if quick else {})))
    rows += linear_cross_entropy.main(linear_cross_entropy.LinearCrossEntropyBenchConfig(
        threads=threads, out_dir=out_dir, device=dev, dtype="bfloat16" if dev == "cuda" else "float32", **q,
        **(dict(shapes=("small",)) if quick else {})))
    rows += train.main(train.TrainBenchConfig(threads=threads, out_dir=out_dir, **q,
                                              **(dict(batch_size=2, batches=1) if quick else {})))
    rows += chat.main(chat.ChatBenchConfig(threads=threads, out_dir=out_dir, **q, **(
        dict(presets=("eagle-tiny-x5",), reply_tokens=2) if quick else {})))
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
