"""python -m eagle_fast.eval — answer a benchmark's questions with a model and score them officially.

    python -m eagle_fast.eval --model PATH --task textvqa --data QUESTIONS.jsonl --image-folder DIR --out results/
    python -m eagle_fast.eval --model PATH --task easy-vqa --out results/        # built-in, offline
    # sharded: run --shard 0..N-1 (any machines, same --out), then merge and score
    python -m eagle_fast.eval --model PATH --task gqa --data Q.jsonl --num-shards 4 --shard 1 --out r/
    python -m eagle_fast.eval --task gqa --data Q.jsonl --num-shards 4 --merge --out r/
    python -m eagle_fast.eval --task gqa --score-only --out r/                   # re-score, no model

Predictions are appended as they come: rerunning the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from eagle_fast.eval.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m eagle_fast.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or preset (not needed to score)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", default=None, help="question JSONL (LLaVA eval layout); easy-vqa: built in")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--out", default="results")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--score-only", action="store_true", help="score the existing prediction file(s)")
    p.add_argument("--merge", action="store_true", help="merge finished shards and score")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0 <= args.shard < args.num_shards:
        p.error(f"--shard must be in [0, {args.num_shards})")

    from eagle_fast.eval.runner import EvalConfig, run, table

    data, folder = args.data, args.image_folder
    if args.task == "easy-vqa" and data is None:
        from eagle_fast.data.builtin import easy_vqa_dataset

        ds = easy_vqa_dataset(os.path.join(args.out, "easy-vqa-data"))
        data, folder = ds.eval, folder or ds.image_folder
    if data is None and not args.score_only:
        p.error("--data is needed (a question JSONL)")
    cfg = EvalConfig(task=args.task, data=data, out=args.out, model=args.model, image_folder=folder or ".",
                     template=args.template, batch_size=args.batch_size, num_shards=args.num_shards,
                     shard=args.shard, limit=args.limit, score_only=args.score_only, merge=args.merge,
                     max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device)
    result = run(cfg)
    if result is None:
        print(f"shard {args.shard} of {args.num_shards} done; merge with --merge once every shard has finished")
        return 0
    print(table(result))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
