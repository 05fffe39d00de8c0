"""The evaluation runner on a tiny checkpoint and real easy-VQA images: question layouts and their
errors, batched generation to JSONL, resume after an interruption (torn last line included),
shards + merge equal to one run, score-only without a model, a broken image reported not fatal,
the CLI, and the predictions' fingerprint: a rerun resumes, another model / template / setting is
refused naming what differs, overwrite replaces, mixed shards do not merge."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from eagle_fast.eval.fingerprint import PredictionsMismatch
from eagle_fast.eval.runner import EvalConfig, load_questions, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREDS = "easy-vqa.predictions.jsonl"


def _saved_model(tmp_path_factory, seed):
    from eagle_fast.inference import load_model

    torch.manual_seed(seed)
    d = tmp_path_factory.mktemp("evalmodel")
    for part in load_model("eagle-tiny-clip"):
        part.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _saved_model(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory):
    """Another model of the same config: only its weights differ from `ckpt`."""
    return _saved_model(tmp_path_factory, 1)


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
            f.write(
                json.dumps(
                    {
                        "question_id": f"q{k}",
                        "image": os.path.basename(paths[ids[k]]),
                        "text": qs[k],
                        "answer": answers[k],
                    }
                )
                + "\n"
            )
    return str(path), os.path.dirname(paths[ids[0]])


def _cfg(tmp_path, ckpt, questions, **kw):
    data, folder = questions
    return EvalConfig(
        task="easy-vqa", data=data, out=str(tmp_path / "out"), model=ckpt, image_folder=folder, batch_size=3, **kw
    )


def _preds(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_question_layouts_and_errors(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(
        json.dumps(
            {
                "id": "a",
                "image": "x.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape?"},
                    {"from": "gpt", "value": "circle"},
                ],
            }
        )
        + "\n\n"
        + json.dumps({"question_id": 7, "text": "Q?", "answers": ["x"]})
        + "\n"
    )
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
    shutil.copy(tmp_path / "a" / "out" / f"{PREDS}.meta.json", out)  # the same model and settings made them
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
    got = {
        r["question_id"]: r["prediction"]
        for k in range(3)
        for r in _preds(tmp_path / "sh" / "out" / f"easy-vqa.shard{k}of3.jsonl")
    }
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
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "eagle_fast.eval",
            "--model",
            ckpt,
            "--task",
            "easy-vqa",
            "--limit",
            "5",
            "--out",
            str(tmp_path),
            "--batch-size",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| easy-vqa | accuracy (%), majority baseline" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == 5 and summary["errors"] == 0
    # another template into the same folder: refused from the command line, replaced with --overwrite
    again = [
        sys.executable,
        "-m",
        "eagle_fast.eval",
        "--model",
        ckpt,
        "--task",
        "easy-vqa",
        "--limit",
        "5",
        "--out",
        str(tmp_path),
        "--batch_size",
        "5",
        "--template",
        "chatml",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(again, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode != 0 and "--overwrite" in res.stderr and "template" in res.stderr, res.stderr[-2000:]
    res = subprocess.run(again + ["--overwrite"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "easy-vqa.predictions.jsonl.meta.json").read_text())
    assert "chatml" in json.dumps(meta)


def test_answers_end_at_the_template_stop(tmp_path, ckpt, questions, monkeypatch):
    """A reply ends at the template's stop string (chatml's <|im_end|> is not the EOS): whatever the
    model would generate after it never reaches the prediction."""
    from eagle_fast.inference.batch_engine import BatchEngine

    seen = {}

    def fake_batch(self, prompts, images, gen):
        seen["stop"] = gen.stop
        return [self.tokenizer("yes<|im_end|> no no", add_special_tokens=False)["input_ids"] for _ in prompts]

    monkeypatch.setattr(BatchEngine, "generate_batch", fake_batch)
    run(_cfg(tmp_path, ckpt, questions, template="chatml"))
    assert seen["stop"] == ("<|im_end|>",)
    preds = _preds(tmp_path / "out" / "easy-vqa.predictions.jsonl")
    assert len(preds) == 7 and all(p["prediction"] == "yes" for p in preds), preds


def _forbid_generation(monkeypatch):
    import eagle_fast.inference as inf

    monkeypatch.setattr(inf, "load_model", lambda *a, **k: pytest.fail("a finished run loaded the model again"))


def test_the_same_run_again_resumes_and_regenerates_nothing(tmp_path, ckpt, questions, monkeypatch):
    first = run(_cfg(tmp_path, ckpt, questions))
    out = tmp_path / "out"
    before = {p: (out / p).read_bytes() for p in (PREDS, PREDS + ".meta.json")}
    assert first["fingerprint"] == json.loads(before[PREDS + ".meta.json"])["fingerprint"]
    _forbid_generation(monkeypatch)
    again = run(_cfg(tmp_path, ckpt, questions))
    assert {p: (out / p).read_bytes() for p in before} == before and again["score"] == first["score"]
    # a copy of the checkpoint and of the question file elsewhere are the same model and questions
    copy = shutil.copytree(ckpt, tmp_path / "copied-model")
    data = shutil.copy(questions[0], tmp_path / "copied-questions.jsonl")
    run(_cfg(tmp_path, str(copy), (str(data), questions[1])))
    assert (out / PREDS).read_bytes() == before[PREDS]


def test_another_model_into_the_same_folder_is_refused_naming_the_weights(tmp_path, ckpt, ckpt2, questions):
    run(_cfg(tmp_path, ckpt, questions))
    before = (tmp_path / "out" / PREDS).read_bytes()
    with pytest.raises(PredictionsMismatch) as e:
        run(_cfg(tmp_path, ckpt2, questions))
    msg = str(e.value)
    assert PREDS in msg and "holds 7 predictions" in msg and "weights (model.safetensors)" in msg, msg
    assert "model (config" not in msg and "template" not in msg and "--overwrite" in msg and "--out" in msg, msg
    assert (tmp_path / "out" / PREDS).read_bytes() == before  # untouched


def test_other_settings_or_questions_are_refused_naming_them(tmp_path, ckpt, questions):
    run(_cfg(tmp_path, ckpt, questions, limit=5, dtype="float32"))
    before = (tmp_path / "out" / PREDS).read_bytes()
    edited = tmp_path / "edited.jsonl"
    recs = [json.loads(x) for x in open(questions[0])]
    recs[6]["text"] += " Answer in one word."  # same ids, same count: only the content tells
    edited.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for kw, what in [
        (dict(template="chatml"), "template ('vicuna_v1' there, 'chatml' now)"),
        (dict(max_new_tokens=4), "generation settings (max_new_tokens: 8 there, 4 now)"),
        (dict(dtype="bfloat16"), "generation settings (dtype: 'float32' there, 'bfloat16' now)"),
        (dict(limit=6), "limit (5 there, 6 now)"),
        (dict(data=str(edited)), "question file (content)"),
    ]:
        data = kw.pop("data", questions[0])
        with pytest.raises(PredictionsMismatch) as e:
            run(_cfg(tmp_path, ckpt, (data, questions[1]), **{"limit": 5, "dtype": "float32", **kw}))
        assert what in str(e.value) and "weights" not in str(e.value), (kw, str(e.value))
    assert (tmp_path / "out" / PREDS).read_bytes() == before


def test_overwrite_replaces_the_other_models_predictions(tmp_path, ckpt, ckpt2, questions):
    fresh = _preds_of_run(tmp_path / "fresh2", ckpt2, questions)
    assert fresh != _preds_of_run(tmp_path / "fresh1", ckpt, questions)  # else the test tells nothing
    run(_cfg(tmp_path, ckpt, questions))
    result = run(_cfg(tmp_path, ckpt2, questions, overwrite=True))
    assert _preds(tmp_path / "out" / PREDS) == fresh and result["n"] == 7
    meta = json.loads((tmp_path / "out" / f"{PREDS}.meta.json").read_text())
    assert meta["fingerprint"] == result["fingerprint"] and meta["model_path"] == ckpt2
    run(_cfg(tmp_path, ckpt2, questions))  # now the second model's file: it resumes
    with pytest.raises(PredictionsMismatch, match="weights"):
        run(_cfg(tmp_path, ckpt, questions))


def test_shards_of_different_models_refuse_to_merge(tmp_path, ckpt, ckpt2, questions):
    cfg = lambda k, model=ckpt, **kw: _cfg(tmp_path, model, questions, num_shards=2, shard=k, **kw)
    run(cfg(0))
    run(cfg(1, ckpt2))  # its own file: nothing to refuse yet
    for merging in (
        cfg(0, merge=True),
        EvalConfig(task="easy-vqa", data=None, out=str(tmp_path / "out"), num_shards=2, score_only=True),
    ):
        with pytest.raises(
            PredictionsMismatch,
            match=r"easy-vqa\.shard1of2\.jsonl \(shard 1\) was made with "
            r"another model .*weights \(model\.safetensors\)",
        ):
            run(merging)
    assert not (tmp_path / "out" / "easy-vqa.results.json").exists()
    run(cfg(1, overwrite=True))
    assert run(cfg(0, merge=True))["n"] == 7
    # a shard without its fingerprint cannot be vouched for
    os.remove(tmp_path / "out" / "easy-vqa.shard0of2.jsonl.meta.json")
    with pytest.raises(PredictionsMismatch, match=r"shard0of2\.jsonl: no fingerprint"):
        run(cfg(0, merge=True))


def test_merge_refuses_shards_of_other_questions(tmp_path, ckpt, questions):
    cfg = lambda k, **kw: _cfg(tmp_path, ckpt, questions, num_shards=2, shard=k, **kw)
    run(cfg(0))
    run(cfg(1))
    with pytest.raises(PredictionsMismatch, match=r"limit \(None there, 7 now\)"):
        run(cfg(0, merge=True, limit=7))


def test_predictions_without_a_fingerprint_are_not_resumed_but_score(tmp_path, ckpt, questions):
    first = run(_cfg(tmp_path, ckpt, questions))
    os.remove(tmp_path / "out" / f"{PREDS}.meta.json")  # as a run before fingerprints left it
    with pytest.raises(PredictionsMismatch, match=r"holds 7 predictions but no fingerprint .*--overwrite"):
        run(_cfg(tmp_path, ckpt, questions))
    again = run(EvalConfig(task="easy-vqa", data=None, out=str(tmp_path / "out"), score_only=True))
    assert again["score"] == first["score"] and again["fingerprint"] is None


def test_weights_fingerprint_sees_one_changed_tensor_and_ignores_the_path(tmp_path, ckpt):
    """The safetensors hash reads samples of every tensor, not only the header (which is the same for
    any two checkpoints of one config): changing one small tensor alone changes it."""
    from safetensors.torch import load_file, save_file

    from eagle_fast.eval.fingerprint import _model_dir

    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    name = min((k for k in tensors if "mm_projector" in k), key=lambda k: tensors[k].numel())
    for d, change in (("same", 0.0), ("changed", 1e-3)):
        os.makedirs(tmp_path / d)
        save_file(
            {**tensors, name: tensors[name] + change},
            str(tmp_path / d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        shutil.copy(os.path.join(ckpt, "config.json"), tmp_path / d)
    weights = lambda d: _model_dir(str(d))[1]["model.safetensors"]
    assert weights(tmp_path / "same") == weights(ckpt) != weights(tmp_path / "changed")
    assert weights(tmp_path / "same")["size"] == weights(tmp_path / "changed")["size"]


def test_other_weight_files_use_the_zip_crcs(tmp_path):
    from eagle_fast.eval.fingerprint import _other_weights_sha

    big = torch.zeros(3 << 20, dtype=torch.uint8)  # 3 MiB: a change in the middle escapes both 1 MiB ends
    torch.save({"w": big}, tmp_path / "a.bin")
    big[len(big) // 2] = 1
    torch.save({"w": big}, tmp_path / "b.bin")
    assert os.path.getsize(tmp_path / "a.bin") == os.path.getsize(tmp_path / "b.bin")
    assert _other_weights_sha(str(tmp_path / "a.bin")) != _other_weights_sha(str(tmp_path / "b.bin"))


def test_a_preset_is_fingerprinted_by_name_and_config(tmp_path, questions):
    from eagle_fast.eval.fingerprint import differences, of_run

    fp = lambda model: of_run(EvalConfig(task="easy-vqa", data=questions[0], model=model), 8)
    a, b = fp("eagle-tiny-clip"), fp("eagle-tiny-x4")
    assert a == fp("eagle-tiny-clip") and a["components"]["model"]["preset"] == "eagle-tiny-clip"
    assert differences(a["components"], b["components"]).startswith("model (config: ")
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a preset"):
        fp(str(tmp_path / "nowhere"))


def test_both_schedulers_give_the_same_greedy_predictions(tmp_path, ckpt, questions):
    """The continuous-batching engine (default) and the static left-padded batches answer alike."""
    run(_cfg(tmp_path / "a", ckpt, questions))
    run(_cfg(tmp_path / "b", ckpt, questions, scheduler="sequential"))
    a = {p["question_id"]: p["prediction"] for p in _preds(tmp_path / "a" / "out" / "easy-vqa.predictions.jsonl")}
    b = {p["question_id"]: p["prediction"] for p in _preds(tmp_path / "b" / "out" / "easy-vqa.predictions.jsonl")}
    assert len(a) == 7 and a == b
