"""Ids and label masks against the original trainer (NVlabs/EAGLE eagle/train/train.py, LLaVA's
preprocess_* functions, eagle/conversation.py): one test per known difference with its minimal input
and the expected tokens written out from the original's rule, SentencePiece ids compared with
`sentencepiece` itself on generated text, and the original's token-count arithmetic re-implemented
here literally (its constants included) and compared on generated conversations."""

import json
import random

import pytest
import sentencepiece as spm

from eagle_fast.data import EagleDataset
from eagle_fast.data.templates import VICUNA_SYSTEM, get_template
from eagle_fast.data.tokenize import DataError, encode_prompt, normalize_turns, tokenize_conversation
from python_tests.data.conftest import sentencepiece_model_path

IMG, IGN = -200, -100
SP = spm.SentencePieceProcessor(model_file=sentencepiece_model_path())


def _sp_without_dummy_prefix():
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(SP.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


SP0 = _sp_without_dummy_prefix()


def _conv(*messages):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(messages)]


def _tail(tok, out, n):
    """The last n (token, learned) pairs."""
    pairs = [
        ("<image>" if i == IMG else tok.convert_ids_to_tokens(i), lab != IGN)
        for i, lab in zip(out["input_ids"], out["labels"])
    ]
    return pairs[-n:]


def _learned(tok, out):
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(out["input_ids"], out["labels"]) if lab != IGN]


# 1. A token is learned iff the original learns it: the "▁" between "ASSISTANT:" and a reply that
# does not start with a word. preprocess_v1 masks len(tokenize("... ASSISTANT: ")) - 2 tokens (BOS,
# and the "▁" of the trailing space), i.e. everything up to ":"; all that follows is learned.


@pytest.mark.parametrize(
    "reply, learned",
    [
        ("2", ["▁", "2", "</s>"]),
        ("猫", ["▁", "猫", "</s>"]),
        ("🐶", ["▁", "<0xF0>", "<0x9F>", "<0x90>", "<0xB6>", "</s>"]),
        (" 2", ["▁▁", "2", "</s>"]),
        ("\t2", ["▁", "<0x09>", "2", "</s>"]),
    ],
)
@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_learns_the_token_after_the_colon(llama_tokenizer, vicuna_tokenizer, legacy, reply, learned):
    tok = llama_tokenizer if legacy else vicuna_tokenizer
    out = tokenize_conversation(_conv("<image>\nHow many dogs are there?", reply), tok, "vicuna_v1")
    assert _tail(tok, out, len(learned) + 2) == [("ANT", False), (":", False)] + [(t, True) for t in learned]
    assert _learned(tok, out) == learned


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_later_rounds_learn_the_same_token(llama_tokenizer, vicuna_tokenizer, legacy):
    tok = llama_tokenizer if legacy else vicuna_tokenizer
    out = tokenize_conversation(_conv("<image>\nHow many?", "Two.", "And now?", "3"), tok, "vicuna_v1")
    # after "</s>" the slow tokenizer writes "▁US ER" when legacy, "USER" (one piece) when not
    user = ["▁US", "ER"] if legacy else ["USER"]
    assert _tail(tok, out, len(user) + 12) == (
        [("</s>", True)]
        + [(t, False) for t in user + [":", "▁And", "▁now", "?", "▁ASS", "IST", "ANT", ":"]]
        + [("▁", True), ("3", True), ("</s>", True)]
    )
    assert _learned(tok, out) == ["▁Two", ".", "</s>", "▁", "3", "</s>"]


def test_plain_learns_all_but_bos_and_image(llama_tokenizer):
    # preprocess_plain masks len(tokenizer_image_token("<image>")) = 2 tokens: BOS and the image
    out = tokenize_conversation(_conv("<image>\nDescribe.", "2"), llama_tokenizer, "plain")
    assert _tail(llama_tokenizer, out, 5) == [
        ("<s>", False),
        ("<image>", False),
        ("▁", True),
        ("2", True),
        ("<0x0A>", True),
    ]


@pytest.mark.parametrize(
    "template, header",
    [
        ("llama3", [("<|end_header_id|>", False), ("ĊĊ", False)]),
        ("chatml", [("istant", False), ("Ċ", False)]),
    ],
)
def test_header_templates_learn_a_space_led_reply_from_its_first_token(tekken_tokenizer, template, header):
    # the instruction ends with the assistant header; its tokens, counted alone, are masked
    out = tokenize_conversation(_conv("<image>\nWhat is it?", " 2"), tekken_tokenizer, template)
    stop = get_template(template).sep
    assert _tail(tekken_tokenizer, out, 5) == header + [("Ġ", True), ("2", True), (stop, True)]


# 2. llama3: the header's "\n\n" and a reply's leading "\n" merge into one token; preprocess_llama3
# masks len(tokenize(instruction)) tokens, the instruction ending in "\n\n" (one token), so the
# merged token is masked and the reply's next token is the first one learned.


def test_llama3_masks_the_header_newline_merged_with_the_reply(tekken_tokenizer):
    out = tokenize_conversation(_conv("<image>\nWhat is it?", "\nA cat."), tekken_tokenizer, "llama3")
    assert _tail(tekken_tokenizer, out, 9) == [
        ("<|start_header_id|>", False),
        ("ass", False),
        ("istant", False),
        ("<|end_header_id|>", False),
        ("ĊĊĊ", False),
        ("A", True),
        ("Ġcat", True),
        (".", True),
        ("<|eot_id|>", True),
    ]


def test_chatml_masks_the_header_newline_merged_with_the_reply(tekken_tokenizer):
    out = tokenize_conversation(_conv("<image>\nWhat is it?", "\nA cat."), tekken_tokenizer, "chatml")
    assert _tail(tekken_tokenizer, out, 7) == [
        ("ass", False),
        ("istant", False),
        ("ĊĊ", False),
        ("A", True),
        ("Ġcat", True),
        (".", True),
        ("<|im_end|>", True),
    ]


# 3. Empty messages render as Conversation.get_prompt renders them; a record the original masks
# entirely is a counted DataError.


def test_empty_reply_renders_as_the_original(llama_tokenizer):
    tpl = get_template("vicuna_v1")
    turns = normalize_turns(_conv("<image>\nQ?", "", "And?", "Yes."), 1, tpl)
    text = "".join(s.text for s in tpl.render(turns))
    assert text == f"{VICUNA_SYSTEM} USER: <image>\nQ? ASSISTANT:USER: And? ASSISTANT: Yes.</s>"
    out = tokenize_conversation(_conv("<image>\nQ?", "", "And?", "Yes."), llama_tokenizer, "vicuna_v1")
    assert _learned(llama_tokenizer, out) == ["▁Yes", ".", "</s>"]  # nothing for the empty turn
    chatml = get_template("chatml")
    text = "".join(s.text for s in chatml.render(normalize_turns(_conv("<image>\nQ?", "", "And?", "Yes."), 1, chatml)))
    assert text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ?<|im_end|>"
        "<|im_start|>assistant\n<|im_start|>user\nAnd?<|im_end|><|im_start|>assistant\nYes.<|im_end|>"
    )
    assert normalize_turns(_conv("<image>", "x"), 1, tpl)[0] == ("user", "<image>")  # stripped, no "\n"


@pytest.mark.parametrize(
    "template, conv",
    [
        ("vicuna_v1", _conv("<image>\nQ?", "A", "And?", "")),  # last round lacks " ASSISTANT: "
        ("vicuna_v1", _conv("<image>\nQ?")),  # no reply at all
        ("vicuna_v1", _conv("<image>\nQ?", "I said ASSISTANT: hi")),  # the marker twice in one round
        ("llama3", _conv("<image>\nQ?", "A", "And?", "")),  # counts one <|eot_id|> too many
        ("chatml", _conv("<image>\nQ?", "", "And?", "Yes.")),  # the next round has no assistant marker
    ],
)
def test_records_the_original_masks_entirely_are_data_errors(tekken_tokenizer, llama_tokenizer, template, conv):
    tok = llama_tokenizer if template == "vicuna_v1" else tekken_tokenizer
    with pytest.raises(DataError) as e:
        tokenize_conversation(conv, tok, template)
    assert e.value.reason == "no_supervised_tokens"


def test_dataset_counts_an_empty_last_reply(tmp_path, llama_tokenizer):
    path = tmp_path / "data.jsonl"
    records = [
        {"id": "ok", "conversations": _conv("Hi?", "Hello.")},
        {"id": "empty", "conversations": _conv("Hi?", "Hello.", "And?", "")},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = EagleDataset(path, tmp_path, llama_tokenizer, None, "vicuna_v1", max_bad_fraction=1.0)
    good, bad = ds[0], ds[1]
    assert "skipped" not in good and bad["skipped"] == "no_supervised_tokens" and bad["id"] == "empty"
    assert ds.report()["no_supervised_tokens"] == 1


# 4. SentencePiece ids are sentencepiece's (the slow tokenizer's), not the converted fast tokenizer's.


def test_runs_of_spaces_and_a_leading_space_are_sentencepiece_ids(llama_tokenizer, vicuna_tokenizer):
    for tok in (llama_tokenizer, vicuna_tokenizer):
        ids, _ = encode_prompt("A  cat.", tok)
        assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁A", "▁", "▁cat", "."]
        out = tokenize_conversation(_conv("<image>\nDescribe.", " A cat."), tok, "plain")
        assert _tail(tok, out, 7) == [
            ("<s>", False),
            ("<image>", False),
            ("▁", True),
            ("▁A", True),
            ("▁cat", True),
            (".", True),
            ("<0x0A>", True),
        ]


PIECES = [
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    " \n",
    "a",
    "A",
    "cat",
    "Hello",
    "2",
    "10",
    "3.5",
    "猫",
    "です",
    "🐶",
    ".",
    ",",
    "?",
    "'",
    "-",
    "<",
    ">",
    "ASSISTANT:",
    "USER",
]


def _texts(seed, n):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("legacy", [True, False])
def test_ids_are_sentencepiece_ids_on_generated_text(llama_tokenizer, vicuna_tokenizer, legacy):
    tok = llama_tokenizer if legacy else vicuna_tokenizer
    for text in _texts(legacy, 300):
        ids, offsets = encode_prompt(text, tok, add_bos=False)
        assert ids == SP.encode(text), repr(text)
        assert encode_prompt(text, tok)[0] == [1] + SP.encode(text)
        # each piece maps back to the characters it covers: in order, covering the text once (the
        # leading bytes of a byte-fallback character cover nothing: (0, 0), as special tokens)
        spans = [(a, b) for a, b in offsets if b > a]
        assert "".join(text[a:b] for a, b in spans) == text and all(
            b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:])
        ), repr(text)


def _slow_ids(text, legacy):
    """transformers 4.37 LlamaTokenizer(use_fast=False)(text).input_ids for a text whose only special
    token is </s>: legacy, every chunk gets the dummy "▁"; otherwise only the text's start does, and
    a chunk after </s> is encoded as it is (a leading space kept via the "<unk>" prefix trick)."""
    ids = [1]
    for j, chunk in enumerate(text.split("</s>")):
        if j:
            ids.append(2)
        if not chunk:
            continue
        if legacy or j == 0:
            ids += SP.encode(chunk)
        elif chunk.startswith(" "):
            ids += SP0.encode("<unk>" + chunk)[len(SP0.encode("<unk>")) :]
        else:
            ids += SP0.encode(chunk)
    return ids


def _tokenizer_image_token(text, encode, bos=1):
    """mm_utils.tokenizer_image_token: every chunk tokenized with special tokens; when the first
    starts with BOS, the first token of every later chunk is dropped."""
    chunks = [encode(c) for c in text.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == bos else 0
    ids = chunks[0]
    for c in chunks[1:]:
        ids = ids + [IMG] + c[offset:]
    return ids


def _original_v1(text, legacy):
    """preprocess_v1 as written in the original, constants included."""
    tii = lambda s: _tokenizer_image_token(s, lambda c: _slow_ids(c, legacy))  # noqa: E731
    ids = tii(text)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGN]
    for i, rou in enumerate(text.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = len(tii(rou)), len(tii(parts[0])) - 2
        if i != 0 and not legacy:  # tokenizers >= 0.14 and a non-legacy tokenizer
            round_len -= 1
            instruction_len -= 1
        target[cur : cur + instruction_len] = [IGN] * len(target[cur : cur + instruction_len])
        cur += round_len
    target[cur:] = [IGN] * len(target[cur:])
    if cur != len(ids):
        target = [IGN] * len(ids)
    return ids, [IGN if t == IMG else t for t in target]


REPLIES = [
    "2",
    " 2",
    "10 dogs.",
    "猫です",
    "🐶!",
    "\nA cat.",
    "Yes.",
    "A  cat.",
    "  spaced",
    "It's 3.5 m.",
    "\t2",
    "",
]  # "": rounds the original masks whole
QUESTIONS = ["How many?", "What is it?", "And  now?", "猫?", "Count: 3", "Why\nnot?"]


def _conversations(seed, n):
    rng = random.Random(seed)
    for _ in range(n):
        msgs = []
        for r in range(rng.randint(1, 3)):
            q = rng.choice(QUESTIONS)
            msgs += ["<image>\n" + q if r == 0 else q, rng.choice(REPLIES)]
        yield msgs


def _ours(conv, tok, template):
    try:
        out = tokenize_conversation(_conv(*conv), tok, template)
    except DataError:
        return None
    return out["input_ids"], out["labels"]


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_masks_equal_the_original_arithmetic(llama_tokenizer, vicuna_tokenizer, legacy):
    tok = llama_tokenizer if legacy else vicuna_tokenizer
    tpl = get_template("vicuna_v1")
    for conv in _conversations(legacy, 150):
        text = "".join(s.text for s in tpl.render(normalize_turns(_conv(*conv), 1, tpl)))
        ids, labels = _original_v1(text, legacy)
        ours = _ours(conv, tok, "vicuna_v1")
        if all(t == IGN for t in labels):
            assert ours is None, conv
        else:
            assert ours == (ids, labels), conv


def _original_mpt_style(text, tok, template):
    """preprocess_llama3 (cur_len 0, round +1 for <|eot_id|>, -1 after the first round) and the
    chatml preprocess_mpt (cur_len 1, instruction -1) as written, with the tokenizer's BOS on every
    tokenizer call (so llama3's ids start with the double BOS)."""
    tii = lambda s: _tokenizer_image_token(s, lambda c: tok(c)["input_ids"], tok.bos_token_id)  # noqa: E731
    tpl = get_template(template)
    ids = tii(text)
    target = list(ids)
    rounds = text.split(tpl.sep)
    re_rounds = [tpl.sep.join(rounds[:3])] + [tpl.sep.join(rounds[j : j + 2]) for j in range(3, len(rounds), 2)]
    sep = tpl.sep + tpl.assistant
    cur = 0 if template == "llama3" else 1
    target[:cur] = [IGN] * cur
    for i, rou in enumerate(re_rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if template == "llama3":
            round_len, instruction_len = len(tii(rou)) + 1, len(tii(parts[0]))
            if i > 0:
                round_len, instruction_len = round_len - 1, instruction_len - 1
        else:  # no `legacy` attribute on a tokenizers-only tokenizer: no +1
            round_len, instruction_len = len(tii(rou)), len(tii(parts[0])) - 1
        target[cur : cur + instruction_len] = [IGN] * len(target[cur : cur + instruction_len])
        cur += round_len
    target[cur:] = [IGN] * len(target[cur:])
    if cur != len(ids):
        target = [IGN] * len(ids)
    if template == "llama3":  # eagle_fast keeps one <|begin_of_text|>: the tokenizer's own is not added
        assert ids[:2] == [ids[0], ids[0]]
        ids, target = ids[1:], target[1:]
    return ids, [IGN if t == IMG else t for t in target]


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_header_template_masks_equal_the_original_arithmetic(tekken_tokenizer, template):
    tpl = get_template(template)
    for conv in _conversations(template, 120):
        text = "".join(s.text for s in tpl.render(normalize_turns(_conv(*conv), 1, tpl)))
        ids, labels = _original_mpt_style(text, tekken_tokenizer, template)
        ours = _ours(conv, tekken_tokenizer, template)
        if all(t == IGN for t in labels):
            assert ours is None, conv
        else:
            assert ours == (ids, labels), conv
