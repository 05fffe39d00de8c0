"""python -m eagle_fast.eval — answer a benchmark's questions with a model and score them officially.

    python -m eagle_fast.eval --model PATH --task textvqa --data QUESTIONS.jsonl --image-folder DIR --out results/
    python -m eagle_fast.eval --model PATH --task easy-vqa --out results/        # built-in, offline
    python -m eagle_fast.eval --model PATH --task easy-vqa --conversation true --out r/  # follow-ups after own answers
    # sharded: run --shard 0..N-1 (any machines, same --out), then merge and score
    python -m eagle_fast.eval --model PATH --task gqa --data Q.jsonl --num-shards 4 --shard 1 --out r/
    python -m eagle_fast.eval --task gqa --data Q.jsonl --num-shards 4 --merge --out r/
    python -m eagle_fast.eval --task gqa --score-only --out r/                   # re-score, no model

Predictions are appended as they come: rerunning the same command resumes an interrupted run. Each
prediction file carries a fingerprint (model config, weights, questions, template, generation
settings): another model or setting into the same folder is an error, unless --overwrite replaces.
"""

from __future__ import annotations

import json
import os
import sys

from eagle_fast.cli import ConfigParser


def parse(argv: list[str] | None = None):
    """EvalConfig from the flags (every field is one: --image_folder / --image-folder, ...)."""
    from eagle_fast.eval.runner import EvalConfig
    from eagle_fast.eval.tasks import TASKS

    p = ConfigParser("python -m eagle_fast.eval", __doc__)
    p.add_config(EvalConfig, choices={"task": sorted(TASKS)})
    given = p.parse_given(argv)
    try:
        cfg = EvalConfig(**given)
    except ValueError as e:
        p.error(str(e))
    if not 0 <= cfg.shard < cfg.num_shards:
        p.error(f"--shard must be in [0, {cfg.num_shards})")
    if cfg.task == "easy-vqa" and cfg.data is None:
        from eagle_fast.data.easy_vqa import easy_vqa_dataset

        ds = easy_vqa_dataset(os.path.join(cfg.out, "easy-vqa-data"))
        cfg.data, cfg.image_folder = ds.eval, given.get("image_folder", ds.image_folder)
    if cfg.data is None and not cfg.score_only:
        p.error("--data is needed (a question JSONL)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    from eagle_fast.eval.fingerprint import PredictionsMismatch
    from eagle_fast.eval.runner import run, table

    cfg = parse(argv)
    try:
        result = run(cfg)
    except PredictionsMismatch as e:  # a decision for the user, not a crash: no traceback
        print(f"python -m eagle_fast.eval: error: {e}", file=sys.stderr)
        return 2
    if result is None:
        print(f"shard {cfg.shard} of {cfg.num_shards} done; merge with --merge once every shard has finished")
        return 0
    print(table(result))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
