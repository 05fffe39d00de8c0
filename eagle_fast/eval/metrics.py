"""Official scoring functions of the standard multimodal benchmarks, as plain functions.

Each scorer reimplements the behaviour of the script its docstring names, quirks included, so that
numbers computed here match the published ones. Per-sample scorers return floats in [0, 1]; average
them with ``mean_score``. The yes/no and multiple-choice scorers (MME, POPE, ScienceQA/MMBench/SEED
choice extraction, MMBench circular evaluation) live in ``choice_metrics`` and are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from eagle_fast.eval.choice_metrics import extract_choice, mmbench_circular, mme_scores, pope_scores

__all__ = [
    "VQA_PROCESSING",
    "anls",
    "extract_choice",
    "gqa_accuracy",
    "levenshtein",
    "mean_score",
    "mmbench_circular",
    "mme_scores",
    "normalize_answer",
    "ocrbench_scores",
    "pope_scores",
    "relaxed_accuracy",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------------------------------
# VQA answer normalisation: tables of the VQA eval (GT-Vision-Lab vqaEval.py), which mmf's / LLaVA's
# EvalAIAnswerProcessor (llava/eval/m4c_evaluator.py) carries over unchanged. Stored as "key:value"
# pairs; keys with capitals (Im, Ive, ...) can never match lowercased text, but are kept for fidelity.
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
    itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
    shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
    somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
    someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
    someones:someone's somethingd:something'd somethingd've:something'd've
    something'dve:something'd've somethingll:something'll thats:that's thered:there'd
    thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
    theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
    wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
    whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
    whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
    whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
    wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
    yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()
)
_NUMBER_WORDS = {  # "none" -> "0" is sic, from the official map
    **{w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())},
    "none": "0",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official period regex is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a malformed look-behind (a
# look-ahead for the text "<="), which can never match before a ".", so only the look-ahead acts:
# a period is dropped unless a digit follows ("3.5" stays, "3." -> "3", "a.5" stays).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official scripts pass re.UNICODE (== 32) as sub()'s *count* argument: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_M4C_COMMA = re.compile(r"(?<=\d),+(?=\d)")  # EvalAIAnswerProcessor.COMMA_STRIP
_VQAEVAL_COMMA = re.compile(r"\d,\d")  # vqaEval.py commaStrip


def _process_punctuation(text: str, comma_re: re.Pattern) -> str:
    # A mark touching a space (or any digit,digit comma in the text) is deleted, else it becomes a
    # space: "1,000" -> "1000" and "yes, sir" -> "yes sir" but "black/white" -> "black white".
    # The tests look at the *input* text while the replacements accumulate, as the original does.
    delete_all = comma_re.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if delete_all or (p + " " in text or " " + p in text) else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """VQA answer normalisation, exactly ``EvalAIAnswerProcessor.__call__`` (llava/eval/m4c_evaluator.py).

    Lowercase; delete every "," and "?" and split "'s" off its word; newline/tab -> space; strip;
    punctuation per the VQA rules (see ``_process_punctuation``); periods not followed by a digit
    dropped; number words zero..ten (and "none") -> digits; articles a/an/the removed; contractions
    restored ("dont" -> "don't").
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text, _M4C_COMMA))


# vqa_accuracy's ``processing`` modes and the script each reproduces.
VQA_PROCESSING = ("m4c", "vqaeval", "eagle_submission", "vqaeval_2016")


def _vqaeval_clean(text: str) -> str:
    # vqaEval.py's whitespace cleanup, applied to the prediction and (since a013f00) every answer.
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqaeval_process(text: str) -> str:
    return _process_digit_article(_process_punctuation(text, _VQAEVAL_COMMA))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, processing: str = "m4c") -> float:
    """VQA soft accuracy (VQAv2, TextVQA, VizWiz) of one prediction against the human answers.

    For each of the n leave-one-out subsets of the n answers, min(#answers equal to the prediction /
    3, 1); the mean over subsets. With 10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0.
    VizWiz's "unanswerable" is an ordinary answer string and needs no special case.

    ``processing`` picks the official script whose normalisation is reproduced:
      * ``"m4c"`` (default): ``TextVQAAccuracyEvaluator`` in llava/eval/m4c_evaluator.py, which LLaVA
        (and Eagle) use for TextVQA: prediction and every answer go through ``normalize_answer``
        (``EvalAIAnswerProcessor``, which lowercases).
      * ``"vqaeval"``: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py as of
        a013f00 (2021, "Fixed processing answers bug"; the VQAv2 / VizWiz servers' script):
        prediction and answers get newline/tab -> space and strip; only when the stripped answers
        are not all identical do both also get punctuation + digit/article processing (which
        lowercases). Identical answers are compared verbatim: "Two" against ten "Two" scores 1,
        "two" against ten "Two" scores 0. The script itself never lowercases an unprocessed
        prediction; the caller does (see ``"eagle_submission"``).
      * ``"eagle_submission"``: what Eagle's VQAv2 / VizWiz number is: its
        scripts/convert_vqav2_for_submission.py / convert_vizwiz_for_submission.py pass the raw
        prediction through ``EvalAIAnswerProcessor`` (``normalize_answer``), and the server scores
        that with ``"vqaeval"``.
      * ``"vqaeval_2016"``: vqaEval.py before a013f00: answers never stripped; the prediction always
        gets punctuation + digit/article processing; differing answers get punctuation processing
        only (so an all-"Two" answer set never matches any prediction, whose "two" became "2").

    Deliberate deviations: the official loops accept exactly the dataset's 10 answers; any n >= 2
    works here, and with a single answer (where leave-one-out leaves nothing to match) the score
    is exact match. The mean is taken in integer arithmetic (sum of min(3, k) over 3n), which equals
    the official value exactly instead of up to float rounding.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if processing == "m4c":
        pred = normalize_answer(prediction)
        refs = [normalize_answer(a) for a in answers]
    elif processing in ("vqaeval", "eagle_submission"):
        raw = normalize_answer(prediction) if processing == "eagle_submission" else prediction
        pred = _vqaeval_clean(raw)
        refs = [_vqaeval_clean(a) for a in answers]
        if len(set(refs)) > 1:
            refs = [_vqaeval_process(a) for a in refs]
            pred = _vqaeval_process(pred)
    elif processing == "vqaeval_2016":
        pred = _vqaeval_process(_vqaeval_clean(prediction))
        refs = list(answers)
        if len(set(refs)) > 1:
            refs = [_process_punctuation(a, _VQAEVAL_COMMA) for a in refs]
    else:
        raise ValueError(f"processing must be one of {', '.join(VQA_PROCESSING)}; got {processing!r}")
    hits = [ref == pred for ref in refs]
    matches = sum(hits)
    if len(refs) == 1:
        return float(matches)
    # Leaving answer i out leaves (matches - hits[i]) matching answers among the other n - 1.
    return sum(min(3, matches - hit) for hit in hits) / (3 * len(refs))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insert / delete / substitute), as ``editdistance.eval``."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction (DocVQA, InfographicVQA), as the RRC evaluation script
    (rrc.cvc.uab.es, ``infographicsvqa_eval.py``; pix2struct's ``anls_metric`` agrees).

    Both strings are stripped, lowercased and whitespace-collapsed before the edit distance; the
    normaliser is max(len) of the *raw* strings (an official quirk, reproduced: ``len(s.upper())``).
    Score = 1 - min over answers of the normalised distance, set to 0 when it is *below*
    ``threshold``: a distance of exactly 0.5 keeps its 0.5. Two empty strings score 1.
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for ref in refs:
        length = max(len(ref.upper()), len(prediction.upper()))
        dist = levenshtein(" ".join(ref.strip().lower().split()), pred)
        distances.append(0.0 if length == 0 else dist / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def _to_float(text: str) -> float | None:
    # pix2struct's parser: a trailing "%" means a percentage ("5%" -> 0.05); anything float()
    # refuses ("1,000", "5 %" with a trailing space, words) is not a number.
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy, as ``relaxed_correctness`` in google-research/pix2struct metrics.py
    (also used by lmms-eval's ChartQA task).

    If the prediction parses as a number and the target as a non-zero number, correct iff
    |pred - target| / |target| <= tolerance (inclusive). Otherwise (non-numeric, or target 0)
    case-insensitive exact string match, without stripping. "96%" and "0.96" are the same number.
    A list of targets scores the best one, as pix2struct's aggregation does.
    """
    targets = [target] if isinstance(target, str) else list(target)
    pred_value = _to_float(prediction)
    for tgt in targets:
        tgt_value = _to_float(tgt)
        if pred_value is not None and tgt_value:  # target 0 falls back to string match, as official
            ok = abs(pred_value - tgt_value) / abs(tgt_value) <= tolerance
        else:
            ok = prediction.lower() == tgt.lower()
        if ok:
            return 1.0
    return 0.0


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA exact match, as LLaVA's scripts/convert_gqa_for_eval.py + llava/eval/eval_gqa.py:
    the prediction loses its trailing periods and is lowercased; the gold answer is used verbatim
    (GQA's answers are lowercase). Like LLaVA, the prediction is assumed already stripped."""
    return float(prediction.rstrip(".").lower() == answer)


# OCRBench (Yuliang-Liu/MultimodalOCR, OCRBench/scripts/*.py): the six recognition types that make
# up its "Text Recognition (Total 300)" sub-score.
OCRBENCH_RECOGNITION_TYPES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
_OCRBENCH_HME_TYPE = "Handwritten Mathematical Expression Recognition"


def _ocrbench_hit(prediction: str, answers: str | Sequence[str], formula: bool) -> bool:
    if formula:  # LaTeX: spacing is arbitrary, so all spaces (and newlines) go; case is kept
        norm = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
    else:
        norm = lambda s: s.lower().strip().replace("\n", " ")  # noqa: E731
    refs = [answers] if isinstance(answers, str) else answers
    pred = norm(prediction)
    return any(norm(ref) in pred for ref in refs)


def ocrbench_scores(records: Iterable[dict]) -> dict:
    """OCRBench counting, as the evaluation block of OCRBench/scripts/*.py (Yuliang-Liu/MultimodalOCR).

    records: dicts with ``type`` (OCRBench category), ``answers`` (str or list of str),
    ``prediction`` and optionally ``dataset_name``. A record scores 1 when any answer is a substring
    of the prediction after normalisation: for HME100k (``dataset_name == "HME100k"``, or the
    "Handwritten Mathematical Expression Recognition" type, which only HME100k supplies) strip,
    newline -> space and every space removed, case kept; for all others lowercase, strip,
    newline -> space.

    Returns ``{"categories": {type: #correct}, "totals": {type: #records}, "text_recognition":
    sum over the six recognition types, "final_score": sum of all correct (out of 1000 on the full
    benchmark), "results": [0/1 per record]}``.
    """
    categories: dict[str, int] = {}
    totals: dict[str, int] = {}
    results = []
    for rec in records:
        kind = rec["type"]
        formula = rec.get("dataset_name") == "HME100k" or kind == _OCRBENCH_HME_TYPE
        hit = int(_ocrbench_hit(rec["prediction"], rec["answers"], formula))
        results.append(hit)
        categories[kind] = categories.get(kind, 0) + hit
        totals[kind] = totals.get(kind, 0) + 1
    return {
        "categories": categories,
        "totals": totals,
        "text_recognition": sum(categories.get(t, 0) for t in OCRBENCH_RECOGNITION_TYPES),
        "final_score": sum(categories.values()),
        "results": results,
    }


def mean_score(values: Iterable[float]) -> float:
    """Mean of per-sample scores (floats or bools); raises on an empty input rather than guess."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_score of no values")
    return sum(vals) / len(vals)
