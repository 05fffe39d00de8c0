"""Yes/no and multiple-choice scorers: MME, POPE, choice-letter extraction (ScienceQA / MMBench /
SEED) and MMBench circular evaluation. Re-exported by ``eagle_fast.eval.metrics``."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters",
    "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _mme_parse(prediction: str) -> str:
    # MME calculation.py parse_pred_ans on the lowercased prediction: exact yes/no, else look for
    # "yes" then "no" within the first 4 characters ("not sure" -> "no"); anything else is "other"
    # and always wrong. The official tool does not strip the prediction, so neither do we.
    if prediction in ("yes", "no"):
        return prediction
    head = prediction[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores, as MME's official eval_tool/calculation.py.

    records: dicts with ``category``, ``answer`` (gt "Yes"/"No", any case), ``prediction`` and the
    image id in ``image`` (or, as in LLaVA's MME files, in ``question_id``, shared by the two
    questions of an image). Per category: acc = % of questions right, acc+ = % of images with both
    questions right, score = acc + acc+ (so at most 200). Perception / cognition totals sum the
    categories present among the 10 / 4 official ones (exact, case-sensitive names, e.g. "OCR").
    Like the official asserts, raises ValueError on a gt other than yes/no or an image that does
    not have exactly two questions.

    Returns ``{"categories": {cat: {"acc", "acc_plus", "score", "other"}}, "perception",
    "cognition", "total"}`` where ``other`` counts unparseable predictions.
    """
    images: dict[str, dict[str, list[bool]]] = {}
    others: dict[str, int] = {}
    for rec in records:
        gt = rec["answer"].lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {rec['answer']!r}")
        pred = _mme_parse(rec["prediction"].lower())
        cat = rec["category"]
        image = rec["image"] if "image" in rec else rec["question_id"]
        images.setdefault(cat, {}).setdefault(image, []).append(pred == gt)
        others[cat] = others.get(cat, 0) + (pred == "other")
    categories = {}
    for cat, per_image in images.items():
        if any(len(v) != 2 for v in per_image.values()):
            raise ValueError(f"MME category {cat!r}: every image needs exactly two questions")
        flat = [ok for v in per_image.values() for ok in v]
        acc = sum(flat) / len(flat) * 100
        acc_plus = sum(all(v) for v in per_image.values()) / len(per_image) * 100
        categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "other": others[cat]}
    perception = sum(categories[c]["score"] for c in MME_PERCEPTION if c in categories)
    cognition = sum(categories[c]["score"] for c in MME_COGNITION if c in categories)
    return {"categories": categories, "perception": perception, "cognition": cognition,
            "total": perception + cognition}  # fmt: skip


def _pope_says_no(text: str) -> bool:
    # LLaVA eval_pope.py: keep the text before the first ".", drop commas, split on single spaces;
    # "no" iff one of the words is exactly "No", "no" or "not" (so "NO" and "Not" count as yes).
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def pope_scores(records: Iterable[Mapping]) -> dict:
    """POPE metrics, as LLaVA's llava/eval/eval_pope.py (run once per POPE split by the caller).

    records: dicts with ``prediction`` (raw model text) and ``label`` (or ``answer``): "no" is the
    negative class, any other label positive, as the official script maps them. Returns accuracy,
    precision, recall, f1, yes_ratio (fractions) and the tp/fp/tn/fn counts. Deliberate deviation:
    where the official script would divide by zero (no "yes" predictions, or no positives), the
    metric is 0.0 instead of an exception.
    """
    tp = fp = tn = fn = 0
    for rec in records:
        pred_yes = not _pope_says_no(rec["prediction"])
        label_yes = rec["label" if "label" in rec else "answer"] != "no"
        tp += pred_yes and label_yes
        fp += pred_yes and not label_yes
        tn += not pred_yes and not label_yes
        fn += not pred_yes and label_yes
    total = tp + fp + tn + fn
    if total == 0:
        raise ValueError("pope_scores of no records")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / total, "tp": tp, "fp": fp, "tn": tn, "fn": fn}  # fmt: skip


# VLMEvalKit vlmeval/utils/matching_util.py: refusals that can_infer_option maps to "Z" (no answer).
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_NO_ANSWER = object()  # can_infer_option's "Z": the model gave no option, do not try the texts


def _option_table(options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(options, Mapping):
        table = {str(k): str(v) for k, v in options.items()}
    else:
        table = {string.ascii_uppercase[i]: str(v) for i, v in enumerate(options)}
    if not table or any(len(k) != 1 or k not in string.ascii_uppercase for k in table):
        raise ValueError(f"options must be non-empty and keyed by single capital letters: {options!r}")
    return table


def _sqa_options(letters: dict[str, str]) -> tuple[str, ...]:
    # The official scripts' args.options: ["A", "B", "C", "D", "E"]; later option letters are added
    # so that longer lists work too. A tuple: `in` must test equality, not substrings.
    return ("A", "B", "C", "D", "E") + tuple(k for k in letters if k not in "ABCDE")


# eval_science_qa.py's pattern: "." is any character but a newline, so the letter must be followed
# by one ("The answer is A" at the very end of the text does not match).
_EAGLE_SQA_ANSWER = re.compile(r"The answer is ([A-Z]).")


def _eagle_sqa_letter(text: str, letters: dict[str, str]) -> str | None:
    # Eagle's eagle/eval/eval_science_qa.py (LLaVA-1.5's rules): the raw text is an option letter;
    # else it starts "X. "; else "The answer is X" + one more character occurs exactly once. Then
    # get_pred_idx: a letter that is not one of the question's options is wrong (None here).
    options = _sqa_options(letters)
    if text in options:
        decided = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        decided = text[0]
    else:
        found = _EAGLE_SQA_ANSWER.findall(text)
        decided = found[0] if len(found) == 1 else None
    return decided if decided in letters else None


def _llava_sqa_late_letter(text: str, letters: dict[str, str]) -> str | None:
    # Later haotian-liu/LLaVA eval_science_qa.py (5200b75), newlines already turned into ". ": the
    # stripped answer is a letter; else it starts "X. "; else it contains "The answer is X." /
    # "The answer is X" (first match). The first rule that fires decides, even on a letter past the
    # last option (then the answer is wrong: None).
    alphabet = "".join(_sqa_options(letters))
    stripped = text.strip()
    if len(stripped) == 1 and stripped in alphabet:
        decided = stripped
    elif len(text) >= 3 and text[0] in alphabet and text[1:3] == ". ":
        decided = text[0]
    elif "The answer is " in text:
        pattern = f"The answer is ([{alphabet}])"
        match = re.search(pattern + r"\.", text) or re.search(pattern, text)
        decided = match.group(1) if match else None
    else:
        decided = None
    return decided if decided in letters else None


def _mmbench_letter(text: str, letters: dict[str, str]):
    # VLMEvalKit can_infer_option: punctuation -> spaces, split into tokens; exactly one option
    # letter among the tokens wins. Its "A may be an article" guard only runs with VERBOSE set, so
    # by default "A cat" answers A. No letter but a "Z" token, or a known refusal, means no answer.
    if "Failed to obtain answer via API" in text:
        return None
    if any(refusal in text for refusal in _REFUSALS):
        return _NO_ANSWER
    tokens = text.translate(_OPTION_SEPARATORS).split()
    found = [letter for letter in letters if letter in tokens]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in tokens:
        return _NO_ANSWER
    return None


def _mmbench_text(text: str, letters: dict[str, str]) -> str | None:
    # VLMEvalKit can_infer_text: the option whose (lowercased) text occurs in the answer, if unique.
    lowered = text.lower()
    found = [letter for letter, option in letters.items() if option.lower() in lowered]
    return found[0] if len(found) == 1 else None


EXTRACT_STYLES = ("auto", "eagle_sqa", "llava_sqa_late", "mmbench")


def extract_choice(prediction: str, options: Sequence[str] | Mapping[str, str], *, style: str = "auto") -> str | None:
    """The option letter a free-form answer chose, or None when it chose none or is ambiguous.

    ``options``: option texts in order (letters A, B, C, ...) or a mapping letter -> text.
    ``style`` picks the official rules:
      * ``"eagle_sqa"``: NVlabs/EAGLE eagle/eval/eval_science_qa.py (LLaVA-1.5's rules, which Eagle
        ships): the raw answer (not stripped) is exactly a letter; else it starts with "X. "; else
        the regex ``The answer is ([A-Z]).`` matches exactly once ("." is one more character other
        than a newline, so "The answer is A" at the very end, or twice in the text, is no answer).
        A letter that is not one of the options is wrong (None).
      * ``"llava_sqa_late"``: the later haotian-liu/LLaVA llava/eval/eval_science_qa.py (5200b75):
        newlines read as ". ", then the stripped answer is a letter; else it starts with "X. "; else
        it contains "The answer is X." or "The answer is X" (first occurrence). The first rule that
        fires decides; a letter past the last option gives None.
      * ``"mmbench"``: MMBench ``can_infer`` (VLMEvalKit vlmeval/utils/matching_util.py, 18fc37a): with
        ``.()[],:;!*#{}`` read as spaces, exactly one valid letter occurs as a standalone token
        ("(B)", "B.", "Answer: B"); several letters are ambiguous ("A or B"); a lone "Z" token or a
        known refusal means no answer (None, no further rule). Else the option whose text occurs
        (case-insensitively) in the answer, if exactly one does.
      * ``"auto"`` (default, lenient, no official script): the ``"eagle_sqa"`` rules, then (when they
        yield None) the ``"mmbench"`` rules.
    Generalisation: the official ScienceQA scripts only know the letters A-E; option letters past E
    count too.
    """
    letters = _option_table(options)
    if style not in EXTRACT_STYLES:
        raise ValueError(f"style must be one of {', '.join(EXTRACT_STYLES)}; got {style!r}")
    if style == "llava_sqa_late":
        return _llava_sqa_late_letter(prediction.replace("\n", ". "), letters)
    if style in ("eagle_sqa", "auto"):
        letter = _eagle_sqa_letter(prediction, letters)
        if letter is not None or style == "eagle_sqa":
            return letter
    letter = _mmbench_letter(prediction, letters)
    if letter is _NO_ANSWER:
        return None
    return letter if letter is not None else _mmbench_text(prediction, letters)


def mmbench_circular(records: Iterable[Mapping]) -> dict:
    """MMBench circular evaluation, as VLMEvalKit's MMBench evaluation (and lmms-eval's copy of it).

    records: one dict per circular variant, with ``index`` (the original question's id, shared by
    all its circularly shifted variants; VLMEvalKit numbers variant k as index + k * 1e6, so pass
    ``index % 1_000_000`` there), ``answer`` (the gt letter of this variant), ``prediction`` and
    optionally ``options`` (list or letter -> text mapping; when given, the letter is taken with
    ``extract_choice(..., style="mmbench")``, else the stripped prediction must be the letter) and
    ``category``. A question is correct only if every one of its variants is.

    Returns ``{"accuracy", "num_questions", "num_correct", "per_question": {index: bool},
    "categories": {category: accuracy}}`` (accuracies as fractions; a question's category is its
    first variant's).
    """
    per_question: dict = {}
    category_of: dict = {}
    for rec in records:
        if rec.get("options") is not None:
            letter = extract_choice(rec["prediction"], rec["options"], style="mmbench")
        else:
            letter = rec["prediction"].strip()
        idx = rec["index"]
        per_question[idx] = per_question.get(idx, True) and letter == rec["answer"]
        if "category" in rec:
            category_of.setdefault(idx, rec["category"])
    if not per_question:
        raise ValueError("mmbench_circular of no records")
    by_category: dict[str, list[bool]] = {}
    for idx, cat in category_of.items():
        by_category.setdefault(cat, []).append(per_question[idx])
    num_correct = sum(per_question.values())
    return {
        "accuracy": num_correct / len(per_question),
        "num_questions": len(per_question),
        "num_correct": num_correct,
        "per_question": per_question,
        "categories": {cat: sum(v) / len(v) for cat, v in by_category.items()},
    }
