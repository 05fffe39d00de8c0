"""The evaluation runner on a tiny checkpoint and real easy-VQA images: question layouts and their
errors, batched generation to JSONL, resume after an interruption (torn last line included),
shards + merge equal to one run, score-only without a model, a broken image reported not fatal,
and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from eagle_fast.eval.runner import EvalConfig, load_questions, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from eagle_fast.inference import load_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("evalmodel")
    for part in load_model("eagle-tiny-clip"):
        part.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Seven easy-VQA test questions in the LLaVA eval layout (real images of the package)."""
    import easy_vqa

    qs, answers, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    d = tmp_path_factory.mktemp("questions")
    path = d / "q.jsonl"
    with open(path, "w") as f:
        for k in range(7):
            f.write(json.dumps({"question_id": f"q{k}", "image": os.path.basename(paths[ids[k]]), "text": qs[k],
                                "answer": answers[k]}) + "\n")
    return str(path), os.path.dirname(paths[ids[0]])


def _cfg(tmp_path, ckpt, questions, **kw):
    data, folder = questions
    return EvalConfig(task="easy-vqa", data=data, out=str(tmp_path / "out"), model=ckpt, image_folder=folder,
                      batch_size=3, **kw)


def _preds(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_question_layouts_and_errors(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]}) + "\n\n"
        + json.dumps({"question_id": 7, "text": "Q?", "answers": ["x"]}) + "\n")
    a, b = load_questions(str(p))
    assert (a["question_id"], a["text"], a["answer"]) == ("a", "What shape?", "circle") and b["question_id"] == 7
    p.write_text(json.dumps({"question_id": 1, "text": "a"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: not a question record"):
        load_questions(str(p))
    p.write_text(json.dumps({"question_id": 1, "text": "a"}) + "\n" + json.dumps({"question_id": 1, "text": "b"}))
    with pytest.raises(ValueError, match="q.jsonl:2: duplicate question_id 1"):
        load_questions(str(p))


def test_run_scores_and_resumes_after_a_torn_write(tmp_path, ckpt, questions):
    result = run(_cfg(tmp_path / "a", ckpt, questions))
    full = _preds(tmp_path / "a" / "out" / "easy-vqa.predictions.jsonl")
    assert [r["question_id"] for r in full] == [f"q{k}" for k in range(7)] and result["n"] == 7
    hits = sum(r["prediction"].lower().strip(".") == r["answer"] for r in full)
    assert result["accuracy"] == pytest.approx(hits / 7) and 0 < result["majority_baseline"] <= 1
    saved = json.load(open(tmp_path / "a" / "out" / "easy-vqa.results.json"))
    assert saved["score"] == pytest.approx(100 * hits / 7)

    # an interrupted run: 4 answers written, the 5th torn mid-line
    out = tmp_path / "b" / "out"
    out.mkdir(parents=True)
    lines = (tmp_path / "a" / "out" / "easy-vqa.predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "easy-vqa.predictions.jsonl").write_text("".join(lines[:4]) + lines[4][:10])
    resumed = run(_cfg(tmp_path / "b", ckpt, questions))
    assert _preds(out / "easy-vqa.predictions.jsonl") == full and resumed["score"] == result["score"]


def test_shards_merge_to_the_single_run(tmp_path, ckpt, questions):
    single = _preds_of_run(tmp_path / "one", ckpt, questions)
    cfg = lambda k, **kw: _cfg(tmp_path / "sh", ckpt, questions, num_shards=3, shard=k, **kw)
    assert run(cfg(0)) is None and run(cfg(2)) is None
    with pytest.raises(FileNotFoundError, match="shard 1 of 3 has not run"):
        run(cfg(0, merge=True))
    run(cfg(1))
    merged = run(cfg(0, merge=True))
    assert merged["n"] == 7
    got = {r["question_id"]: r["prediction"] for k in range(3)
           for r in _preds(tmp_path / "sh" / "out" / f"easy-vqa.shard{k}of3.jsonl")}
    assert got == {r["question_id"]: r["prediction"] for r in single}


def _preds_of_run(base, ckpt, questions):
    run(_cfg(base, ckpt, questions))
    return _preds(base / "out" / "easy-vqa.predictions.jsonl")


def test_score_only_needs_no_model(tmp_path, ckpt, questions, monkeypatch):
    first = run(_cfg(tmp_path, ckpt, questions))
    import eagle_fast.inference as inf

    monkeypatch.setattr(inf, "load_model", lambda *a, **k: pytest.fail("score-only loaded a model"))
    again = run(EvalConfig(task="easy-vqa", data=None, out=str(tmp_path / "out"), score_only=True))
    assert again["score"] == first["score"] and again["n"] == 7


def test_a_broken_image_is_reported_and_the_run_goes_on(tmp_path, ckpt, questions):
    data, folder = questions
    recs = [json.loads(x) for x in open(data)]
    recs[2]["image"] = "no-such-image.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = run(_cfg(tmp_path, ckpt, (str(bad), folder)))
    preds = _preds(tmp_path / "out" / "easy-vqa.predictions.jsonl")
    assert result["n"] == 7 and result["errors"] == 1
    (err,) = [r for r in preds if r.get("error")]
    assert err["question_id"] == "q2" and "no-such-image.png" in err["error"]


def test_cli_builtin_easy_vqa(tmp_path, ckpt):
    res = subprocess.run([sys.executable, "-m", "eagle_fast.eval", "--model", ckpt, "--task", "easy-vqa",
                          "--limit", "5", "--out", str(tmp_path), "--batch-size", "5"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| easy-vqa | accuracy (%), majority baseline" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == 5 and summary["errors"] == 0


def test_answers_end_at_the_template_stop(tmp_path, ckpt, questions, monkeypatch):
    """A reply ends at the template's stop string (chatml's <|im_end|> is not the EOS): whatever the
    model would generate after it never reaches the prediction."""
    from eagle_fast.inference.engine import Engine

    seen = {}

    def fake_batch(self, prompts, images, gen):
        seen["stop"] = gen.stop
        return [self.tokenizer("yes<|im_end|> no no", add_special_tokens=False)["input_ids"] for _ in prompts]

    monkeypatch.setattr(Engine, "generate_batch", fake_batch)
    run(_cfg(tmp_path, ckpt, questions, template="chatml"))
    assert seen["stop"] == ("<|im_end|>",)
    preds = _preds(tmp_path / "out" / "easy-vqa.predictions.jsonl")
    assert len(preds) == 7 and all(p["prediction"] == "yes" for p in preds), preds
