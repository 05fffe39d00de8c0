"""python -m eagle_fast.bench {preprocess} [--threads 1 2] [--repeats 7] [--out-dir bench_results]"""

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
    args = parser.parse_args(argv)

    if args.bench in ("preprocess", "fused_preprocess"):
        from eagle_fast.bench.fused_preprocess import PreprocessBenchConfig, main as run

        run(PreprocessBenchConfig(threads=tuple(args.threads), repeats=args.repeats, out_dir=args.out_dir,
                                  gpu_batch=args.gpu_batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
