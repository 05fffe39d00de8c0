"""Hand-worked cases for the official benchmark scorers, including each official script's edge cases."""

import pytest

from eagle_fast.eval.metrics import (
    anls,
    extract_choice,
    gqa_accuracy,
    levenshtein,
    mean_score,
    mmbench_circular,
    mme_scores,
    normalize_answer,
    ocrbench_scores,
    pope_scores,
    relaxed_accuracy,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),  # sic, official map
        ("a dog", "dog"),  # articles dropped
        ("The Dog.", "dog"),  # lowercase + trailing period
        ("dont", "don't"),  # contraction table
        ("don't", "don't"),
        ("1,000", "1000"),  # comma between digits: the number stays one token
        ("3.5", "3.5"),  # a period before a digit is a decimal point
        ("3.", "3"),
        ("e.g.", "eg"),
        ("black/white", "black white"),  # mark not touching a space -> space
        ("hello - world", "hello world"),  # mark touching a space -> deleted
        ("yes, sir", "yes sir"),
        ("What?", "what"),
        ("it's red", "it 's red"),  # EvalAIAnswerProcessor splits "'s" off
        ("\tRed\n", "red"),
        ("." * 40, "." * 8),  # re.UNICODE passed as sub()'s count: only 32 periods removed
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _answers(matching: str, k: int, n: int = 10) -> list[str]:
    return [matching] * k + [f"other{i}" for i in range(n - k)]


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    # k of 10 answers match. Leaving out a matching answer leaves k-1 matches, a non-matching one k:
    #   k=1: (1*min(0/3,1) + 9*min(1/3,1)) / 10 = 3/10          = 0.3
    #   k=2: (2*min(1/3,1) + 8*min(2/3,1)) / 10 = (2/3+16/3)/10 = 0.6
    #   k=3: (3*min(2/3,1) + 7*min(3/3,1)) / 10 = (2+7)/10      = 0.9  (not 1.0: leave-one-out)
    #   k=4: (4*min(3/3,1) + 6*min(4/3,1)) / 10                  = 1.0
    assert vqa_accuracy("dog", _answers("dog", k)) == expected  # exact, not approx


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("A dog.", _answers("dog", 2)) == 0.6
    assert vqa_accuracy("dont", _answers("don't", 1)) == 0.3
    assert vqa_accuracy("1,000", _answers("1000", 4)) == 1.0
    assert vqa_accuracy("3.5", _answers("35", 4)) == 0.0  # the decimal point is not dropped


def test_vqa_accuracy_vizwiz_unanswerable():
    answers = ["unanswerable"] * 7 + ["a cat"] * 3
    assert vqa_accuracy("Unanswerable.", answers) == 1.0
    assert vqa_accuracy("cat", answers) == 0.9
    assert vqa_accuracy("dog", answers) == 0.0


def test_vqa_accuracy_vqaeval_processing():
    # GT-Vision-Lab/VQA vqaEval.py at a013f00: prediction and answers lose newlines/tabs and outer
    # spaces; only when the stripped answers differ do both get punctuation + digit/article
    # processing (which lowercases); identical answers are compared verbatim.
    assert vqa_accuracy("Two", ["Two"] * 10, processing="vqaeval") == 1.0  # "Two" == "Two"
    assert vqa_accuracy("two", ["Two"] * 10, processing="vqaeval") == 0.0  # verbatim: case counts
    assert vqa_accuracy("yes", ["yes "] * 10, processing="vqaeval") == 1.0  # answers stripped
    assert vqa_accuracy("blue\n", ["\tblue"] * 10, processing="vqaeval") == 1.0
    # nine "two" + one "2" differ: every answer and the prediction become "2": 10 matches -> 1.0
    assert vqa_accuracy("two", ["two"] * 9 + ["2"], processing="vqaeval") == 1.0
    # Without EvalAIAnswerProcessor's comma deletion, "red,blue" becomes "red blue": 2 of 10 -> 0.6.
    answers = ["red,blue"] * 2 + _answers("x", 0, 8)
    assert vqa_accuracy("red blue", answers, processing="vqaeval") == 0.6
    assert vqa_accuracy("red blue", answers) == 0.0  # m4c: "redblue"
    # A digit,digit comma anywhere deletes every punctuation mark instead of spacing it: "1,000" ->
    # "1000", 3 of 4 answers: leaving a match out leaves 2 (2/3, three times), leaving "x" out 3 (1):
    # (3 * 2/3 + 1) / 4 = 0.75.
    assert vqa_accuracy("1000", ["1,000", "1,000", "1,000", "x"], processing="vqaeval") == 0.75


def test_vqa_accuracy_eagle_submission():
    # Eagle's convert_vqav2_for_submission.py runs EvalAIAnswerProcessor on the prediction ("Yes"
    # -> "yes", "Two" -> "2") before the server's vqaEval.py (a013f00) compares it.
    assert vqa_accuracy("Yes", ["yes"] * 10, processing="eagle_submission") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, processing="vqaeval") == 0.0
    assert vqa_accuracy("Two", ["2"] * 10, processing="eagle_submission") == 1.0
    # identical answers stay verbatim on the server: "2" against ten "two" does not match
    assert vqa_accuracy("Two", ["two"] * 10, processing="eagle_submission") == 0.0
    assert vqa_accuracy("Two", ["two"] * 9 + ["2"], processing="eagle_submission") == 1.0


def test_vqa_accuracy_vqaeval_2016_processing():
    # vqaEval.py before a013f00: the prediction is always processed, the answers never stripped and
    # only punctuation-processed when they differ.
    assert vqa_accuracy("Two", ["Two"] * 10, processing="vqaeval_2016") == 0.0  # "2" vs "Two"
    assert vqa_accuracy("two", ["two"] * 9 + ["2"], processing="vqaeval_2016") == 0.3  # 1 match
    assert vqa_accuracy("yes", ["yes "] * 10, processing="vqaeval_2016") == 0.0  # "yes" vs "yes "
    mixed = ["Two"] * 5 + ["2"] * 5
    assert vqa_accuracy("two", mixed, processing="vqaeval_2016") == 1.0  # 5 matches


def test_vqa_accuracy_answer_counts():
    assert vqa_accuracy("yes", ["yes"]) == 1.0  # single answer: exact match (documented deviation)
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("yes", ["yes", "yes"]) == pytest.approx(1 / 3)  # each subset: 1 match / 3
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError):
        vqa_accuracy("yes", ["yes"], processing="vqa")


# ----------------------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_threshold_boundary():
    assert anls("ab", ["ac"]) == 0.5  # NL distance exactly 0.5 keeps its 0.5
    assert anls("abc", ["axy"]) == 0.0  # NL 2/3 -> similarity 1/3 < 0.5
    assert anls("ab", ["ac"], threshold=0.6) == 0.0
    assert anls("abcd", ["abcx"]) == 0.75


def test_anls_normalisation_and_max():
    assert anls("  Hello   World ", "hello world") == 1.0  # case + whitespace ignored
    assert anls("abcd", ["zzzz", "abcx"]) == 0.75  # best answer
    # The normaliser is max(len) of the *raw* strings: distance 1 over len("ab  d") = 5.
    assert anls("ab  d", ["ab c"]) == pytest.approx(0.8)
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0


# ------------------------------------------------------------------------------------- ChartQA


def test_relaxed_accuracy_pix2struct_cases():
    # pix2struct metrics_test.py's relaxed-accuracy cases: 5 of 8 correct.
    preds = ["abc", "abc", "Abc", "100%", "100%", "100%", "100%", "Don't"]
    targets = ["abc", "Abc", "abc", "96%", "94%", "0.96", "0.94", "Won't"]
    scores = [relaxed_accuracy(p, t) for p, t in zip(preds, targets)]
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_relaxed_accuracy_boundary():
    assert relaxed_accuracy("105", "100") == 1.0  # exactly 5%: inclusive
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("105.1", "100") == 0.0
    assert relaxed_accuracy("94.9", "100") == 0.0
    assert relaxed_accuracy("-104", "-100") == 1.0  # relative to |target|


def test_relaxed_accuracy_percent_zero_and_strings():
    assert relaxed_accuracy("5%", "0.05") == 1.0
    assert relaxed_accuracy("5", "5%") == 0.0  # 5 vs 0.05
    assert relaxed_accuracy("0", "0") == 1.0  # target 0 -> string match
    assert relaxed_accuracy("0.0", "0") == 0.0
    assert relaxed_accuracy("0.001", "0") == 0.0
    assert relaxed_accuracy("Yes", "yes") == 1.0
    assert relaxed_accuracy("yes ", "yes") == 0.0  # no stripping
    assert relaxed_accuracy("1,000", "1000") == 0.0  # "1,000" is not a float
    assert relaxed_accuracy("10", ["50", "10.4"]) == 1.0  # best of several targets


# ----------------------------------------------------------------------------------------- GQA


def test_gqa_accuracy():
    assert gqa_accuracy("Yes.", "yes") == 1.0
    assert gqa_accuracy("Left..", "left") == 1.0
    assert gqa_accuracy("left side", "left") == 0.0
    assert gqa_accuracy("yes", "no") == 0.0


# ----------------------------------------------------------------------------------------- MME


def _mme(cat, image, answer, prediction):
    return {"category": cat, "image": image, "answer": answer, "prediction": prediction}


def test_mme_scores():
    records = [
        _mme("existence", "1.jpg", "Yes", "Yes"),
        _mme("existence", "1.jpg", "No", "No, there is not."),
        _mme("existence", "2.jpg", "Yes", "yes, there is"),
        _mme("existence", "2.jpg", "No", "Yes"),  # one of two wrong: image fails acc+
        _mme("code_reasoning", "3.png", "Yes", "There is"),  # unparseable -> "other", wrong
        _mme("code_reasoning", "3.png", "No", "Not sure"),  # "not " contains "no"
    ]
    out = mme_scores(records)
    ex, code = out["categories"]["existence"], out["categories"]["code_reasoning"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert (code["acc"], code["acc_plus"], code["score"], code["other"]) == (50.0, 0.0, 50.0, 1)
    assert (out["perception"], out["cognition"], out["total"]) == (125.0, 50.0, 175.0)


def test_mme_image_id_fallback_and_validation():
    recs = [{"category": "OCR", "question_id": "a.jpg", "answer": "yes", "prediction": "yes"},
            {"category": "OCR", "question_id": "a.jpg", "answer": "no", "prediction": "no"},
            {"category": "mystery", "question_id": "b.jpg", "answer": "no", "prediction": "no"},
            {"category": "mystery", "question_id": "b.jpg", "answer": "no", "prediction": "no"}]  # fmt: skip
    out = mme_scores(recs)
    assert out["categories"]["OCR"]["score"] == 200.0
    assert out["perception"] == 200.0  # "mystery" is not an official category: in no total
    assert out["total"] == 200.0
    with pytest.raises(ValueError):  # three questions on one image
        mme_scores(recs[:2] + [dict(recs[0])])
    with pytest.raises(ValueError):
        mme_scores([_mme("OCR", "x", "maybe", "yes"), _mme("OCR", "x", "no", "no")])


# ---------------------------------------------------------------------------------------- POPE


def test_pope_all_yes():
    labels = ["yes", "yes", "yes", "no", "no"]
    out = pope_scores([{"prediction": "Yes, there is a dog.", "label": lab} for lab in labels])
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (3, 2, 0, 0)
    assert out["accuracy"] == 0.6 and out["precision"] == 0.6 and out["recall"] == 1.0
    assert out["f1"] == pytest.approx(0.75)  # 2 * 0.6 * 1 / 1.6
    assert out["yes_ratio"] == 1.0


def test_pope_answer_parsing():
    said_no = {"No, there is not.": True, "There is no dog.": True, "It is not.": True, "no": True,
               "Yes. But no cat.": False,  # only the first sentence counts
               "NO": False, "Not at all": False,  # case-sensitive word match (official quirk)
               "Yes, but not clearly": True}  # fmt: skip
    for text, no in said_no.items():
        out = pope_scores([{"prediction": text, "label": "yes"}])
        assert out["fn"] == int(no), text


def test_pope_mixed_and_zero_division():
    recs = [("Yes", "yes"), ("No", "yes"), ("No", "no"), ("Yes", "no"), ("Yes", "yes"), ("No", "no")]
    out = pope_scores([{"prediction": p, "answer": lab} for p, lab in recs])
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 1, 2, 1)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["yes_ratio"] == 0.5
    all_no = pope_scores([{"prediction": "No", "label": "yes"}, {"prediction": "No", "label": "no"}])
    assert (all_no["precision"], all_no["recall"], all_no["f1"], all_no["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


# -------------------------------------------------------------------------------- multiple choice

OPTS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("A", "A"),
        (" B ", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("B. dog", "B"),
        ("The answer is C.", "C"),
        ("Answer: (D) fish", "D"),
        ("dog", "B"),  # option text
        ("I think it is a bird", "C"),
        ("A or B", None),  # two letters, no option text: ambiguous
        ("cat and dog", None),  # two option texts
        ("E", None),  # not an option
        ("Z", None),  # MMBench's "no answer"
        ("Cannot determine the answer, maybe cat", None),  # refusal: text rule not tried
        ("A cat is shown", "A"),  # VLMEvalKit's article guard is off unless VERBOSE: letter wins
        ("B. Because A is wrong", "B"),  # ScienceQA prefix rule first
        ("The answer is A, not B", "A"),
    ],
)
def test_extract_choice_auto(prediction, expected):
    assert extract_choice(prediction, OPTS) == expected


def test_extract_choice_styles():
    assert extract_choice("B. Because A is wrong", OPTS, style="mmbench") is None  # letters B and A
    assert extract_choice("The answer is A, not B", OPTS, style="mmbench") is None
    assert extract_choice("(A)", OPTS, style="eagle_sqa") is None  # not a ScienceQA format
    assert extract_choice("dog", OPTS, style="eagle_sqa") is None
    assert extract_choice("The answer is E.", OPTS, style="eagle_sqa") is None  # only 4 options
    # ScienceQA: the first rule that fires decides, even on an out-of-range letter ...
    assert extract_choice("E. The answer is B.", OPTS, style="eagle_sqa") is None
    assert extract_choice("E. The answer is B.", OPTS, style="llava_sqa_late") is None
    # ... while "auto" then falls through to MMBench's rules, where B is the only valid letter.
    assert extract_choice("E. The answer is B.", OPTS) == "B"
    assert extract_choice("F", [str(i) for i in range(6)], style="eagle_sqa") == "F"  # options past E
    with pytest.raises(ValueError, match="eagle_sqa"):
        extract_choice("A", OPTS, style="gpt")
    with pytest.raises(ValueError):
        extract_choice("A", OPTS, style="llava_sqa")  # ambiguous: Eagle's copy or the later one


@pytest.mark.parametrize(
    ("prediction", "eagle", "late"),
    [
        # Eagle's eval_science_qa.py: exact letter; "X. " prefix; else re.findall(r"The answer is
        # ([A-Z]).") must find exactly one match ("." = one more character, not a newline).
        ("A", "A", "A"),
        ("B. dog", "B", "B"),
        ("The answer is C.", "C", "C"),
        ("The answer is A", None, "A"),  # nothing after the letter: no match
        ("The answer is A. The answer is B.", None, "A"),  # two matches
        ("A\nB", None, "A"),  # not a letter, no "X. ": the later script rewrites "\n" as ". "
        ("The answer is A\n", None, "A"),  # "." does not match a newline
        (" A", None, "A"),  # not stripped
        ("The answer is AB", "A", "A"),  # "." matched "B"
        ("D.", None, None),
    ],
)
def test_extract_choice_scienceqa_official(prediction, eagle, late):
    assert extract_choice(prediction, OPTS, style="eagle_sqa") == eagle
    assert extract_choice(prediction, OPTS, style="llava_sqa_late") == late


def test_extract_choice_dict_options():
    yes_no = {"A": "yes", "B": "no"}
    assert extract_choice("No", yes_no) == "B"
    assert extract_choice("Yes", yes_no) == "A"
    assert extract_choice("C", {"C": "x", "D": "y"}) == "C"
    assert extract_choice("A", {"C": "x", "D": "y"}) is None
    with pytest.raises(ValueError):
        extract_choice("A", {"AA": "x"})


def test_mmbench_circular_one_wrong_shift_fails_question():
    recs = [{"index": 1, "answer": a, "prediction": a, "category": "ocr"} for a in "ABCD"]
    recs += [{"index": 2, "answer": a, "prediction": p, "category": "ocr"} for a, p in zip("ABCD", "ABCA")]
    recs += [{"index": 3, "answer": a, "prediction": a, "category": "logic"} for a in "BA"]
    out = mmbench_circular(recs)
    assert out["per_question"] == {1: True, 2: False, 3: True}
    assert (out["num_questions"], out["num_correct"]) == (3, 2)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["categories"] == {"ocr": 0.5, "logic": 1.0}


def test_mmbench_circular_extracts_from_text():
    # The same question with its options rotated; "cat" is right in both orders, "(A)" only in one.
    shifts = [(["cat", "dog"], "A"), (["dog", "cat"], "B")]
    by_text = [{"index": 7, "options": o, "answer": a, "prediction": "It is a cat."} for o, a in shifts]
    by_letter = [{"index": 8, "options": o, "answer": a, "prediction": "(A)"} for o, a in shifts]
    assert mmbench_circular(by_text + by_letter)["per_question"] == {7: True, 8: False}
    with pytest.raises(ValueError):
        mmbench_circular([])


# ------------------------------------------------------------------------------------ OCRBench


def test_ocrbench_scores():
    hme = "Handwritten Mathematical Expression Recognition"
    recs = [
        {"type": hme, "dataset_name": "HME100k", "answers": ["x ^ { 2 }"], "prediction": "It is x^{2}"},
        {"type": hme, "dataset_name": "HME100k", "answers": "X ^ { 2 }", "prediction": "x^{2}"},  # case kept
        {"type": "Regular Text Recognition", "answers": ["Hello"], "prediction": "The word is HELLO."},
        {"type": "Regular Text Recognition", "answers": ["new york"], "prediction": "newyork"},  # spaces kept
        {"type": "Doc-oriented VQA", "answers": ["12", "twelve"], "prediction": "Twelve\ndollars"},
    ]
    out = ocrbench_scores(recs)
    assert out["results"] == [1, 0, 1, 0, 1]
    assert out["categories"] == {hme: 1, "Regular Text Recognition": 1, "Doc-oriented VQA": 1}
    assert out["totals"] == {hme: 2, "Regular Text Recognition": 2, "Doc-oriented VQA": 1}
    assert (out["text_recognition"], out["final_score"]) == (1, 3)
    # The space-free rule is what lets "a b" match "ab" for formulas only.
    assert ocrbench_scores([{"type": hme, "answers": "a b", "prediction": "ab"}])["final_score"] == 1
    assert ocrbench_scores([{"type": "IAM", "answers": "a b", "prediction": "ab"}])["final_score"] == 0


def test_mean_score():
    assert mean_score([1.0, 0.0, 0.5]) == 0.5
    assert mean_score([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        mean_score([])


def test_tasks_score_as_eagle_reports():
    from eagle_fast.eval.tasks import get_task

    # VQAv2: the submission converter lowercases "Yes" before vqaEval.py compares it with ten "yes"
    vqa = {"question_id": 1, "prediction": "Yes", "answers": ["yes"] * 10}
    assert get_task("vqav2").scorer([vqa])["score"] == 100.0
    assert get_task("vizwiz").scorer([vqa])["score"] == 100.0
    # ScienceQA: Eagle's eval_science_qa.py finds no answer in "The answer is A" (nothing follows A)
    sqa = {"question_id": 2, "options": ["cat", "dog"], "answer": 0}
    assert get_task("scienceqa").scorer([{**sqa, "prediction": "The answer is A"}])["score"] == 0.0
    assert get_task("scienceqa").scorer([{**sqa, "prediction": "The answer is A."}])["score"] == 100.0
