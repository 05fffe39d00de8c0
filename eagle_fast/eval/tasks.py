"""Evaluation tasks: the prompt a benchmark's questions get, how long answers may be, and how a
finished prediction file is scored with the official metric (eagle_fast.eval.metrics).

A task is a small dataclass; adding one is adding an entry to TASKS. Scorers take the prediction
records (the question's gold fields copied beside `prediction`) and return a dict whose "score" is
the headline number (in the unit the benchmark reports: % for accuracies, MME's summed points,
OCRBench's count) plus the details.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from eagle_fast.eval import metrics as M

# LLaVA's eval prompts (llava/eval/*, scripts/v1_5/eval/*), which Eagle's evaluation uses
SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT


def _answers(rec: dict) -> list[str]:
    """Gold answers as strings: "answers" (strings, or VQA-style {"answer": ...} dicts) or "answer"."""
    raw = rec.get("answers", rec.get("answer"))
    if raw is None:
        raise ValueError(f"question {rec.get('question_id')!r}: no gold 'answers' or 'answer' field")
    raw = raw if isinstance(raw, list) else [raw]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in raw]


def _mean(records: list[dict], fn: Callable[[dict], float]) -> dict:
    return {"score": 100.0 * M.mean_score(fn(r) for r in records)}


def _vqa(processing: str):
    return lambda recs: _mean(recs, lambda r: M.vqa_accuracy(r["prediction"], _answers(r), processing=processing))


def _anls(recs):
    return _mean(recs, lambda r: M.anls(r["prediction"], _answers(r)))


def _relaxed(recs):
    return _mean(recs, lambda r: M.relaxed_accuracy(r["prediction"], _answers(r)))


def _gqa(recs):
    return _mean(recs, lambda r: M.gqa_accuracy(r["prediction"], _answers(r)[0]))


_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$", re.M)


def _options(rec: dict):
    """A record's options: its "options" field, else the "A. text" lines of its question."""
    if rec.get("options"):
        return rec["options"]
    found = dict(_OPTION_LINE.findall(rec.get("text", "")))
    if not found:
        raise ValueError(f"question {rec.get('question_id')!r}: no 'options' and no 'A. ...' lines in its text")
    return found


def _gold_letter(rec: dict) -> str:
    a = rec["answer"]
    return chr(ord("A") + a) if isinstance(a, int) else str(a).strip()


def _choice(style: str = "auto"):
    return lambda recs: _mean(
        recs, lambda r: M.extract_choice(r["prediction"], _options(r), style=style) == _gold_letter(r)
    )


def _mmbench(recs):
    res = M.mmbench_circular(
        [
            {**r, "options": _options(r), "answer": _gold_letter(r), "index": r.get("index", r["question_id"])}
            for r in recs
        ]
    )
    return {"score": 100.0 * res["accuracy"], **{k: v for k, v in res.items() if k != "per_question"}}


def _mme(recs):
    res = M.mme_scores(recs)
    return {"score": res["total"], **res}


def _pope(recs):
    res = M.pope_scores(recs)
    return {"score": 100.0 * res["f1"], **res}


def _ocrbench(recs):
    res = M.ocrbench_scores([{**r, "answers": _answers(r)} for r in recs])
    return {"score": res["final_score"], **{k: v for k, v in res.items() if k != "results"}}


def _exact(recs):
    """Exact match after VQA normalisation against the one gold answer, with the majority-answer
    baseline (always answering the most frequent gold answer) for scale."""
    golds = [M.normalize_answer(_answers(r)[0]) for r in recs]
    hits = [M.normalize_answer(r["prediction"]) == g for r, g in zip(recs, golds)]
    majority = Counter(golds).most_common(1)[0][1] / len(golds)
    out = {"score": 100.0 * sum(hits) / len(hits), "accuracy": sum(hits) / len(hits), "majority_baseline": majority}
    # per question kind and, for conversations, first questions vs follow-ups (asked after turn 0)
    if any("category" in r for r in recs):
        out["categories"] = _split(recs, hits, lambda r: r.get("category", "other"))
    if any("turn" in r for r in recs):
        out["turns"] = _split(recs, hits, lambda r: "first" if r.get("turn", 0) == 0 else "followup")
    return out


def _split(recs: list[dict], hits: list[bool], key: Callable[[dict], str]) -> dict:
    groups: dict[str, list[bool]] = {}
    for r, h in zip(recs, hits):
        groups.setdefault(key(r), []).append(h)
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


@dataclass(frozen=True)
class Task:
    name: str
    scorer: Callable[[list[dict]], dict]
    prompt_suffix: str = SHORT
    max_new_tokens: int = 16
    metric: str = "accuracy (%)"


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("vqav2", _vqa("eagle_submission"), metric="VQA accuracy (%)"),
        Task("textvqa", _vqa("m4c"), metric="VQA accuracy (%)"),
        Task("vizwiz", _vqa("eagle_submission"), VIZWIZ, metric="VQA accuracy (%)"),
        Task("docvqa", _anls, max_new_tokens=32, metric="ANLS (%)"),
        Task("infovqa", _anls, max_new_tokens=32, metric="ANLS (%)"),
        Task("chartqa", _relaxed, metric="relaxed accuracy (%)"),
        Task("gqa", _gqa, metric="exact match (%)"),
        Task("mme", _mme, "", max_new_tokens=8, metric="perception + cognition"),
        Task("pope", _pope, SHORT, max_new_tokens=8, metric="F1 (%)"),
        Task("scienceqa", _choice("eagle_sqa"), CHOICE, max_new_tokens=8),
        Task("seed", _choice(), CHOICE, max_new_tokens=8),
        Task("mmbench", _mmbench, CHOICE, max_new_tokens=8, metric="circular accuracy (%)"),
        Task("ocrbench", _ocrbench, "", max_new_tokens=64, metric="correct (of 1000)"),
        # the built-in set's questions as its training records ask them: no suffix
        Task("easy-vqa", _exact, "", max_new_tokens=8),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
