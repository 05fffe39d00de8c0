"""Built-in offline datasets: real images and questions shipped by a PyPI package, no download.

`easy_vqa_dataset` turns easy-VQA (the `easy-vqa` package: 4000 train / 1000 test 64x64 PNGs of
one coloured shape each, 38575 / 9673 questions, 13 one-word answers) into LLaVA-format JSONL files
for the tiny training recipes and the demo:

- pretrain.jsonl: stage-1 captioning, one record per train image; the caption ("A blue rectangle.")
  is assembled only from that image's own answers, so it is as true as the dataset.
- sft.jsonl: one multi-turn record per train image with all of its questions (or, with
  `questions_per_record=n`, its questions in order, n per record: n=1 gives single-turn records).
- eval.jsonl: one single-turn record per (test image, question) with extra fields: the gold
  "answer", its "category" (color, shape, yes/no color, yes/no shape), and "conversation_id" (the
  image) with "turn" (the question's place among that image's questions), so that an evaluation
  can ask each image's questions as one conversation (eagle_fast.eval, `conversation`).
- val.jsonl (with `val_images=n`): the same layout for the n highest-id train images, which are
  then left out of pretrain.jsonl and sft.jsonl: a validation split held out by image.

The PNGs are not copied: `image_folder` is the package's data directory and records use paths like
"train/images/12.png". Full size: 4000 + 4000 + 9673 records, about 7 MB of JSONL.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import version

from eagle_fast import atomic

_FORMAT = 2  # bump when the records change, so existing files are rebuilt
_SHAPES = ("circle", "rectangle", "triangle")
_CAPTION_PROMPT = "Describe the image briefly."


@dataclass
class BuiltinDataset:
    image_folder: str
    pretrain: str
    sft: str
    eval: str
    answers: list[str]
    val: str | None = None  # with val_images > 0


def category(question: str, answer: str) -> str:
    """easy-VQA's four question kinds: 'what' questions answered by a shape or a colour, and
    yes/no questions naming a shape ("does the image contain a circle?") or a colour."""
    if answer in ("yes", "no"):
        return "yes/no shape" if set(re.findall(r"[a-z]+", question.lower())) & set(_SHAPES) else "yes/no color"
    return "shape" if answer in _SHAPES else "color"


def _facts(questions: list[tuple[str, str]], colors: set[str]) -> tuple[set[str], set[str]]:
    """(present, absent) colour/shape words implied by one image's (question, answer) pairs.
    'what ...' answers and the attributes they name are present; yes/no answers assert the named
    word, inverted by a negation ("is there not a circle?", "is no red shape present?")."""
    present, absent = set(), set()
    for question, answer in questions:
        words = re.findall(r"[a-z]+", question.lower())
        named = {w for w in words if w in colors or w in _SHAPES}
        if answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            (present if (answer == "yes") != negated else absent).update(named)
        else:
            present.update(named | {answer})
    return present, absent


def _caption(questions: list[tuple[str, str]], colors: set[str]) -> str:
    present, absent = _facts(questions, colors)
    shape = next((s for s in _SHAPES if s in present), None)
    color = next((c for c in sorted(colors) if c in present), None)
    caption = "A " + " ".join(w for w in (color, shape or "shape") if w) + "."
    # ~10% of images have no 'what' question for one attribute: say what they are not instead
    if shape is None and (no := [s for s in _SHAPES if s in absent]):
        caption += " It is not a " + " or a ".join(no) + "."
    if color is None and (no := sorted(absent & colors)):
        caption += " It is not " + " or ".join(no) + "."
    return caption


def _group(
    questions: list[str], answers: list[str], ids: list[int], limit: int | None
) -> dict[int, list[tuple[str, str]]]:
    """Questions per image id for the `limit` lowest ids, ids ascending, dataset order within."""
    if limit is not None and limit < 0:
        raise ValueError(f"image limit must be >= 0, got {limit}")
    keep = set(sorted(set(ids))[:limit])
    grouped: dict[int, list[tuple[str, str]]] = {i: [] for i in sorted(keep)}
    for q, a, i in zip(questions, answers, ids):
        if i in keep:
            grouped[i].append((q, a))
    return grouped


def _image_paths(folder: str, split: str, paths: dict[int, str], ids: Iterable[int]) -> dict[int, str]:
    """Relative path per id, checked to name the package's own file (layout changes fail here)."""
    rel = {}
    for i in ids:
        rel[i] = f"{split}/images/{i}.png"
        full = os.path.join(folder, rel[i])
        if os.path.normpath(full) != os.path.normpath(paths[i]) or not os.path.isfile(full):
            raise RuntimeError(f"easy-vqa image {paths[i]} is not at {full}: package layout changed")
    return rel


def _jsonl(records: Iterable[dict]) -> Iterator[str]:
    return (json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def easy_vqa_dataset(
    root: str | os.PathLike,
    max_train_images: int | None = None,
    max_eval_images: int | None = None,
    questions_per_record: int | None = None,
    val_images: int = 0,
) -> BuiltinDataset:
    """Write (or reuse) pretrain/sft/eval JSONL for easy-VQA under `root`; the limits keep the
    lowest image ids of each split. `questions_per_record` splits each image's SFT conversation
    into records of that many questions (ids "easyvqa-train-{image}-{first question}").
    `val_images` holds the highest-id kept train images out of training, as val.jsonl."""
    if questions_per_record is not None and questions_per_record < 1:
        raise ValueError(f"questions_per_record must be >= 1, got {questions_per_record}")
    if val_images < 0:
        raise ValueError(f"val_images must be >= 0, got {val_images}")
    import easy_vqa  # an asset package: imported only when this dataset is asked for

    root = os.fspath(root)
    train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
    # <data>/train/images/<id>.png: <data> holds both splits
    folder = os.path.dirname(os.path.dirname(os.path.dirname(next(iter(train_paths.values())))))
    answers = list(easy_vqa.get_answers())
    out = BuiltinDataset(
        folder,
        *(os.path.join(root, f"{n}.jsonl") for n in ("pretrain", "sft", "eval")),
        answers,
        val=os.path.join(root, "val.jsonl") if val_images else None,
    )

    params = {
        "format": _FORMAT,
        "easy_vqa": version("easy-vqa"),
        "max_train_images": max_train_images,
        "max_eval_images": max_eval_images,
        "questions_per_record": questions_per_record,
        "val_images": val_images,
    }
    manifest = os.path.join(root, "manifest.json")
    try:
        with open(manifest, encoding="utf-8") as f:
            reuse = json.load(f) == params and all(
                os.path.isfile(p) for p in (out.pretrain, out.sft, out.eval, out.val) if p
            )
    except (OSError, ValueError):
        reuse = False
    if reuse:
        return out

    os.makedirs(root, exist_ok=True)
    # drop the manifest first: files half-replaced by an interrupted rebuild are never reused
    try:
        os.unlink(manifest)
    except FileNotFoundError:
        pass
    colors = set(answers) - set(_SHAPES) - {"yes", "no"}
    train = _group(*easy_vqa.get_train_questions(), max_train_images)
    if val_images >= len(train):
        raise ValueError(f"val_images={val_images} leaves no training image of the {len(train)} kept")
    # held out by image: no validation image is ever seen in training, in any stage
    val = {i: train.pop(i) for i in sorted(train)[len(train) - val_images :]}
    test = _group(*easy_vqa.get_test_questions(), max_eval_images)
    train_rel = _image_paths(folder, "train", train_paths, list(train) + list(val))
    test_rel = _image_paths(folder, "test", test_paths, test)

    def human(text: str) -> dict:
        return {"from": "human", "value": text}

    def gpt(text: str) -> dict:
        return {"from": "gpt", "value": text}

    atomic.write_lines(
        out.pretrain,
        _jsonl(
            {
                "id": f"easyvqa-train-{i}",
                "image": train_rel[i],
                "conversations": [human("<image>\n" + _CAPTION_PROMPT), gpt(_caption(qa, colors))],
            }
            for i, qa in train.items()
        ),
    )

    def sft_records(i: int, qa: list[tuple[str, str]]) -> Iterator[dict]:
        n = questions_per_record or max(len(qa), 1)
        for start in range(0, len(qa), n):
            yield {
                "id": f"easyvqa-train-{i}" if questions_per_record is None else f"easyvqa-train-{i}-{start}",
                "image": train_rel[i],
                "conversations": [
                    turn
                    for k, (q, a) in enumerate(qa[start : start + n])
                    for turn in (human(("<image>\n" if k == 0 else "") + q), gpt(a))
                ],
            }

    atomic.write_lines(out.sft, _jsonl(rec for i, qa in train.items() for rec in sft_records(i, qa)))

    def eval_records(split: str, grouped: dict[int, list[tuple[str, str]]], rel: dict[int, str]) -> Iterator[dict]:
        for i, qa in grouped.items():
            for k, (q, a) in enumerate(qa):
                yield {
                    "id": f"easyvqa-{split}-{i}-{k}",
                    "image": rel[i],
                    "conversations": [human("<image>\n" + q), gpt(a)],
                    "answer": a,
                    "category": category(q, a),
                    "conversation_id": f"easyvqa-{split}-{i}",
                    "turn": k,
                }

    atomic.write_lines(out.eval, _jsonl(eval_records("test", test, test_rel)))
    if out.val:
        atomic.write_lines(out.val, _jsonl(eval_records("train", val, train_rel)))
    atomic.write_lines(manifest, _jsonl([params]))
    return out
