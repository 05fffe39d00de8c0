"""A shortened demo end to end (a few steps of each stage, a few test questions): both stages (the
second in its two passes) run through the trainer, the evaluation writes runs/demo/eval.json, the chat API streams answers, and a
second run reuses the finished stages."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo(out):
    res = subprocess.run([sys.executable, "-m", "eagle_fast.demo", "--out", str(out), "--max-steps", "3",
                          "--eval-limit", "24"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_shortened_demo(tmp_path):
    out = _demo(tmp_path / "demo")
    summary = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert set(summary) == {"accuracy", "n", "majority_baseline"} and summary["n"] == 24
    assert 0 <= summary["accuracy"] <= 1 and 0 < summary["majority_baseline"] < 1
    for stage in ("pretrain", "sft-shapes", "sft"):
        steps = [json.loads(x)["step"] for x in open(tmp_path / "demo" / stage / "metrics.jsonl")]
        assert steps[-1] == 3, (stage, steps)
    assert (tmp_path / "demo" / "pretrain" / "mm_projector.bin").exists()
    assert (tmp_path / "demo" / "sft" / "final" / "config.json").exists()
    assert out.count("ASSISTANT: ") == 4 and "python -m eagle_fast.serve --model" in out
    assert "easy-VQA test accuracy" in out
    again = _demo(tmp_path / "demo")  # finished stages are reused, not retrained
    assert "stage 1: reusing" in again and "shape pass: reusing" in again and "stage 2: reusing" in again
    shapes = [json.loads(x) for x in open(tmp_path / "demo" / "data" / "sft-shapes.jsonl")]
    assert shapes and all(r["conversations"][-1]["value"] in ("circle", "rectangle", "triangle") for r in shapes)
