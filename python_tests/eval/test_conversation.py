"""Conversational evaluation: each image's questions asked in turn order, every follow-up after the
model's OWN earlier answers (never the gold ones), resumable; and the easy-VQA scorer's accounting
per question kind and for first questions vs follow-ups."""

import json
import os

import pytest
import torch

from eagle_fast.eval.runner import EvalConfig, run
from eagle_fast.eval.tasks import get_task

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from eagle_fast.inference import load_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("convmodel")
    for part in load_model("eagle-tiny-clip"):
        part.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Two conversations (3 and 2 questions) on real easy-VQA images, written out of turn order."""
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    rows = [
        ("c0", 0, "what shape is in the image?", "circle"),
        ("c1", 1, "what color is the shape?", "red"),
        ("c0", 2, "is there a triangle?", "no"),
        ("c0", 1, "what color is the shape?", "blue"),
        ("c1", 0, "what shape is present?", "rectangle"),
    ]
    path = tmp_path_factory.mktemp("conv") / "q.jsonl"
    with open(path, "w") as f:
        for cid, turn, text, gold in rows:
            f.write(
                json.dumps(
                    {
                        "question_id": f"{cid}-{turn}",
                        "image": os.path.basename(paths[int(cid[1])]),
                        "text": text,
                        "answer": gold,
                        "conversation_id": cid,
                        "turn": turn,
                    }
                )
                + "\n"
            )
    return str(path), os.path.dirname(paths[0])


def _fake_engine(monkeypatch):
    """Engine.generate_batch replaced: answers 'reply<k>' (k counts calls per prompt) and records
    each prompt's text, so the test sees exactly what history every question was asked with."""
    from eagle_fast.inference.batch_engine import BatchEngine

    seen = []

    def fake(self, prompts, images, gen):
        out = []
        for p, img in zip(prompts, images):
            text = self.tokenizer.decode([t for t in p if t >= 0], skip_special_tokens=False)
            seen.append((text, img is not None, -200 in p))
            out.append(self.tokenizer(f"reply{len(seen)}", add_special_tokens=False)["input_ids"])
        return out

    monkeypatch.setattr(BatchEngine, "generate_batch", fake)
    return seen


def test_follow_ups_are_asked_after_the_models_own_answers(tmp_path, ckpt, questions, monkeypatch):
    seen = _fake_engine(monkeypatch)
    data, folder = questions
    cfg = EvalConfig(
        task="easy-vqa",
        data=data,
        out=str(tmp_path),
        model=ckpt,
        image_folder=folder,
        batch_size=8,
        template="vicuna_v1",
        conversation=True,
    )
    result = run(cfg)
    preds = [json.loads(x) for x in open(tmp_path / "easy-vqa.predictions.jsonl")]
    # turn 0 of both conversations first (one batch), then turn 1 of both, then c0's turn 2
    assert [p["question_id"] for p in preds] == ["c0-0", "c1-0", "c0-1", "c1-1", "c0-2"]
    by_id = {p["question_id"]: p["prediction"] for p in preds}
    assert by_id == {"c0-0": "reply1", "c1-0": "reply2", "c0-1": "reply3", "c1-1": "reply4", "c0-2": "reply5"}
    texts = [t for t, _, _ in seen]
    # every prompt carries the image exactly once, in its first turn
    assert all(has_img and placeholder for _, has_img, placeholder in seen)
    # c0's third question: its two earlier questions with the model's answers, not the gold ones
    third = texts[4]
    assert (
        third.index("what shape is in the image?")
        < third.index("reply1")
        < third.index("what color is the shape?")
        < third.index("reply3")
        < third.index("is there a triangle?")
    )
    assert "circle" not in third and "blue" not in third and "reply2" not in third
    # c1's follow-up holds c1's own first exchange only
    assert "reply2" in texts[3] and "reply1" not in texts[3] and "what shape is present?" in texts[3]
    assert result["turns"] == {"first": {"accuracy": 0.0, "n": 2}, "followup": {"accuracy": 0.0, "n": 3}}


def test_conversation_resume_uses_the_answers_already_written(tmp_path, ckpt, questions, monkeypatch):
    seen = _fake_engine(monkeypatch)
    data, folder = questions
    cfg = EvalConfig(
        task="easy-vqa", data=data, out=str(tmp_path), model=ckpt, image_folder=folder, batch_size=8, conversation=True
    )
    run(cfg)
    path = tmp_path / "easy-vqa.predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))  # killed after c0-1: c1-1 and c0-2 remain
    seen.clear()
    run(cfg)
    assert len(seen) == 2 and "reply3" in seen[1][0] and "reply1" in seen[1][0]  # c0-2 after c0's stored answers


def test_conversation_needs_its_fields(tmp_path, ckpt):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question_id": "a", "text": "what?", "answer": "x"}) + "\n")
    cfg = EvalConfig(task="easy-vqa", data=str(p), out=str(tmp_path / "o"), model=ckpt, conversation=True)
    with pytest.raises(ValueError, match="question 'a': --conversation needs 'conversation_id' and 'turn'"):
        run(cfg)


def test_easy_vqa_scores_per_kind_and_per_turn():
    recs = [  # (category, turn, prediction, gold): hits written out by hand below
        dict(category="color", turn=0, prediction="Red", answer="red"),  # hit (normalised)
        dict(category="color", turn=1, prediction="blue", answer="green"),  # miss
        dict(category="shape", turn=0, prediction="circle", answer="circle"),  # hit
        dict(category="shape", turn=2, prediction="circle", answer="triangle"),  # miss
        dict(category="yes/no shape", turn=1, prediction="no", answer="no"),  # hit
        dict(category="yes/no color", turn=3, prediction="yes.", answer="yes"),  # hit (punctuation dropped)
    ]
    res = get_task("easy-vqa").scorer([{**r, "question_id": k} for k, r in enumerate(recs)])
    assert res["accuracy"] == pytest.approx(4 / 6)
    assert res["categories"] == {
        "color": {"accuracy": 0.5, "n": 2},
        "shape": {"accuracy": 0.5, "n": 2},
        "yes/no color": {"accuracy": 1.0, "n": 1},
        "yes/no shape": {"accuracy": 1.0, "n": 1},
    }
    assert res["turns"] == {"first": {"accuracy": 1.0, "n": 2}, "followup": {"accuracy": 0.5, "n": 4}}
    plain = get_task("easy-vqa").scorer([{"question_id": 0, "prediction": "a", "answer": "a"}])
    assert "categories" not in plain and "turns" not in plain  # other question files score as before
