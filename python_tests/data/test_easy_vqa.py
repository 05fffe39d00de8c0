"""easy-VQA as LLaVA JSONL: counts, image paths, turn structure, captions, idempotency."""

import json
import os

import pytest
from PIL import Image

from eagle_fast.data.easy_vqa import easy_vqa_dataset
from eagle_fast.data.records import RecordSource

pytest.importorskip("easy_vqa")

SHAPES = {"circle", "rectangle", "triangle"}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("easyvqa")
    ds = easy_vqa_dataset(root, max_train_images=50, max_eval_images=20)
    return root, ds, _load(ds.pretrain), _load(ds.sft), _load(ds.eval)


def test_counts_and_ids(built):
    from easy_vqa import get_test_questions

    _, _, pretrain, sft, evals = built
    assert len(pretrain) == len(sft) == 50
    assert [r["id"] for r in pretrain] == [f"easyvqa-train-{i}" for i in range(50)]  # lowest ids, ascending
    q, _, ids = get_test_questions()
    assert len(evals) == sum(1 for i in ids if i < 20)
    assert evals[0]["id"] == "easyvqa-test-0-0" and len({r["id"] for r in evals}) == len(evals)


def test_images_resolve_inside_folder(built):
    _, ds, pretrain, sft, evals = built
    folder = os.path.realpath(ds.image_folder)
    for rel in {r["image"] for r in pretrain + sft + evals}:
        assert not os.path.isabs(rel)
        path = os.path.realpath(os.path.join(ds.image_folder, rel))
        assert os.path.commonpath([folder, path]) == folder
        with Image.open(path) as im:
            assert im.size == (64, 64)


def test_sft_turns_alternate(built):
    _, _, _, sft, _ = built
    for r in sft:
        conv = r["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1


def test_eval_answers_known(built):
    _, ds, _, _, evals = built
    assert len(ds.answers) == 13
    for r in evals:
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert r["answer"] == gpt["value"] and r["answer"] in ds.answers


def test_captions_match_answers(built):
    _, ds, pretrain, sft, _ = built
    colors = set(ds.answers) - SHAPES - {"yes", "no"}
    qa = {r["id"]: r["conversations"] for r in sft}
    for r in pretrain:
        assert r["conversations"][0]["value"] == "<image>\nDescribe the image briefly."
        caption = r["conversations"][1]["value"]
        first = set(caption.split(".")[0].split())  # the positive part: "A blue rectangle"
        turns = qa[r["id"]]
        named = {t["value"] for t in turns[1::2]} - {"yes", "no"}  # answers to 'what ...' questions
        assert named <= first, (caption, named)
        # every colour/shape the caption asserts is also backed by some question of that image
        text = " ".join(t["value"] for t in turns)
        assert all(w in text for w in first & (colors | SHAPES)), caption
        assert first & (colors | SHAPES) or "not" in caption


def test_idempotent(built):
    root, ds, *_ = built
    files = (ds.pretrain, ds.sft, ds.eval)
    before = [os.stat(p).st_mtime_ns for p in files]
    again = easy_vqa_dataset(root, max_train_images=50, max_eval_images=20)
    assert again == ds
    assert [os.stat(p).st_mtime_ns for p in files] == before
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_rebuilds_on_new_params(tmp_path):
    easy_vqa_dataset(tmp_path, max_train_images=3, max_eval_images=1)
    smaller = easy_vqa_dataset(tmp_path, max_train_images=2, max_eval_images=1)
    assert len(_load(smaller.pretrain)) == len(_load(smaller.sft)) == 2


def test_record_source_indexes_files(built):
    _, ds, pretrain, sft, evals = built
    for path, records in ((ds.pretrain, pretrain), (ds.sft, sft), (ds.eval, evals)):
        src = RecordSource(path)
        assert len(src) == len(records)
        assert src.read(len(src) - 1).data == records[-1]


def test_questions_per_record_splits_each_conversation_in_order(tmp_path):
    whole = _load(easy_vqa_dataset(tmp_path / "whole", max_train_images=6, max_eval_images=1).sft)

    def pairs(records):
        out = {}
        for r in records:
            conv = r["conversations"]
            assert conv[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in conv) == 1
            out.setdefault(r["image"], []).extend(
                (conv[k]["value"].removeprefix("<image>\n"), conv[k + 1]["value"]) for k in range(0, len(conv), 2)
            )
        return out

    for n in (1, 3):
        split = _load(
            easy_vqa_dataset(tmp_path / str(n), max_train_images=6, max_eval_images=1, questions_per_record=n).sft
        )
        assert all(2 <= len(r["conversations"]) <= 2 * n for r in split)
        assert len({r["id"] for r in split}) == len(split)
        assert pairs(split) == pairs(whole)
    assert len(split) == sum(-(-len(r["conversations"]) // 6) for r in whole)  # ceil(questions / 3) each
    with pytest.raises(ValueError, match="questions_per_record"):
        easy_vqa_dataset(tmp_path / "bad", questions_per_record=0)


def test_validation_split_is_held_out_by_image(tmp_path):
    ds = easy_vqa_dataset(tmp_path, max_train_images=12, max_eval_images=2, val_images=4)
    pretrain, sft, val, evals = (_load(p) for p in (ds.pretrain, ds.sft, ds.val, ds.eval))
    train_images = {r["image"] for r in pretrain} | {r["image"] for r in sft}
    val_images = {r["image"] for r in val}
    # the 4 highest ids of the 12 kept are validation, the other 8 train; no image in both
    assert val_images == {f"train/images/{i}.png" for i in (8, 9, 10, 11)}
    assert train_images == {f"train/images/{i}.png" for i in range(8)}
    assert len(pretrain) == len(sft) == 8  # multi-turn: one SFT record per image
    from easy_vqa import get_train_questions

    qs, answers, ids = get_train_questions()
    expected = [(q, a) for q, a, i in zip(qs, answers, ids) if 8 <= i < 12]
    got = sorted((r["conversations"][0]["value"].removeprefix("<image>\n"), r["answer"], r["image"]) for r in val)
    assert sorted(q for q, _, _ in got) == sorted(q for q, _ in expected) and len(val) == len(expected)
    for r in val + evals:  # conversation fields: one conversation per image, turns 0.. in dataset order
        assert r["conversation_id"] == r["id"].rsplit("-", 1)[0] and r["turn"] == int(r["id"].rsplit("-", 1)[1])
    with pytest.raises(ValueError, match="val_images=12 leaves no training image"):
        easy_vqa_dataset(tmp_path / "x", max_train_images=12, val_images=12)


@pytest.mark.parametrize(
    "question,answer,kind",
    [
        ("what is the red shape?", "triangle", "shape"),  # a 'what' question answered by a shape
        ("what is the color of the triangle?", "red", "color"),  # names a shape, answered by a colour
        ("does the image contain a circle?", "no", "yes/no shape"),
        ("is there not a black shape in the image?", "yes", "yes/no color"),  # 'shape' is not a shape name
        ("is no rectangle present?", "yes", "yes/no shape"),
    ],
)
def test_question_category(question, answer, kind):
    from eagle_fast.data.easy_vqa import category

    assert category(question, answer) == kind


def test_eval_records_carry_category_and_turn(built):
    _, _, _, _, evals = built
    assert {r["category"] for r in evals} <= {"color", "shape", "yes/no color", "yes/no shape"}
    first = [r for r in evals if r["conversation_id"] == "easyvqa-test-0"]
    assert [r["turn"] for r in first] == list(range(len(first)))
    # test image 0 (written out in the package): "what is the red shape?" -> triangle
    assert (first[0]["conversations"][0]["value"], first[0]["category"]) == ("<image>\nwhat is the red shape?", "shape")
