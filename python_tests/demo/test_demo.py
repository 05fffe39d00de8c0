"""A shortened demo end to end (a few steps of each stage, a few questions of each split): every
stage (stage 2 in its two passes) runs through the trainer, the conversational evaluation of the
validation and test splits writes runs/demo/eval.json, the chat streams three turns about one
image, and a second run reuses the finished stages (their manifests match)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo(out):
    res = subprocess.run(
        [sys.executable, "-m", "eagle_fast.demo", "--out", str(out), "--max-steps", "3", "--eval-limit", "24"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_shortened_demo(tmp_path):
    out = _demo(tmp_path / "demo")
    summary = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert set(summary) == {"seed", "llm", "validation", "test"} and summary["seed"] == 0
    for split in ("validation", "test"):
        s = summary[split]
        assert s["n"] == 24 and 0 <= s["accuracy"] <= 1 and 0 < s["majority_baseline"] < 1
        assert sum(v["n"] for v in s["categories"].values()) == 24
        assert set(s["categories"]) <= {"color", "shape", "yes/no color", "yes/no shape"}
        # the first 24 questions are whole conversations of ~10 questions: 2 or 3 first questions
        assert s["turns"]["first"]["n"] + s["turns"]["followup"]["n"] == 24 and 2 <= s["turns"]["first"]["n"] <= 3
    for stage in ("pretrain", "sft-shapes", "sft"):
        steps = [json.loads(x)["step"] for x in open(tmp_path / "demo" / stage / "metrics.jsonl")]
        assert steps[-1] == 3, (stage, steps)
        assert json.loads((tmp_path / "demo" / stage / "demo-stage.json").read_text())["steps"] == 3
    assert (tmp_path / "demo" / "pretrain" / "mm_projector.bin").exists()
    assert (tmp_path / "demo" / "sft" / "final" / "config.json").exists()
    assert out.count("ASSISTANT: ") == 3 and "python -m eagle_fast.serve --model" in out
    assert "easy-VQA validation" in out and "easy-VQA test" in out and "follow-ups" in out
    again = _demo(tmp_path / "demo")  # finished stages are reused, not retrained
    assert "stage 1: reusing" in again and "shape pass: reusing" in again and "stage 2: reusing" in again
    shapes = [json.loads(x) for x in open(tmp_path / "demo" / "data" / "sft-shapes.jsonl")]
    assert shapes and all(
        t["value"] in ("circle", "rectangle", "triangle") for r in shapes for t in r["conversations"][1::2]
    )
