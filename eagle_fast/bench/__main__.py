"""python -m eagle_fast.bench {preprocess,resize_concat} [options]; each subcommand has --help."""

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
    args = parser.parse_args(argv)

    if args.bench in ("preprocess", "fused_preprocess"):
        from eagle_fast.bench.fused_preprocess import PreprocessBenchConfig, main as run

        run(PreprocessBenchConfig(threads=tuple(args.threads), repeats=args.repeats, out_dir=args.out_dir,
                                  gpu_batch=args.gpu_batch, min_sample_ms=args.min_sample_ms))
    elif args.bench == "resize_concat":
        from eagle_fast.bench.resize_concat import ResizeConcatBenchConfig, main as run

        run(ResizeConcatBenchConfig(batch=args.batch, repeats=args.repeats, threads=args.threads, device=args.device,
                                    out_dir=args.out_dir, memory=not args.no_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
