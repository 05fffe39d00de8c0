"""Label masks token by token on real tokenizers, for every template; <image> normalisation; ids
equal to the original LLaVA tokenization (SentencePiece, per <image> chunk)."""

import copy

import pytest
import sentencepiece as spm

from eagle_fast.data.templates import VICUNA_SYSTEM, get_template
from eagle_fast.data.tokenize import DataError, normalize_turns, sequence_length, tokenize_conversation
from python_tests.data.conftest import sentencepiece_model_path

IMG, IGN = -200, -100
CONV = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red cube."},
    {"from": "human", "value": "And its size?"},
    {"from": "gpt", "value": "Small."},
]


def _original_vicuna_ids(text):
    """The original pipeline: split at <image>, SentencePiece each chunk (special tokens split
    out: </s> -> 2), BOS on the first chunk only, chunks joined by -200."""
    sp = spm.SentencePieceProcessor(model_file=sentencepiece_model_path())
    ids = [1]
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids.append(IMG)
        for j, piece in enumerate(chunk.split("</s>")):
            if j:
                ids.append(2)
            if piece:
                ids += sp.encode(piece)
    return ids


def _learned_text(tok, out):
    return tok.decode([t for t in out["labels"] if t != IGN])


def test_vicuna_ids_equal_the_original_and_only_replies_are_learned(llama_tokenizer):
    out = tokenize_conversation(CONV, llama_tokenizer, "vicuna_v1")
    text = (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT: A red cube.</s>"
        f"USER: And its size? ASSISTANT: Small.</s>"
    )
    assert out["input_ids"] == _original_vicuna_ids(text)
    assert out["input_ids"].count(IMG) == 1
    labels = out["labels"]
    assert len(labels) == len(out["input_ids"])
    learned = [i for i, t in enumerate(labels) if t != IGN]
    toks = llama_tokenizer.convert_ids_to_tokens([out["input_ids"][i] for i in learned])
    assert toks == ["▁A", "▁red", "▁c", "ube", ".", "</s>", "▁Small", ".", "</s>"]
    # every learned token is the input token at that position (causal LM labels, shifted by the model)
    assert all(labels[i] == out["input_ids"][i] for i in learned)


def test_plain_template_learns_caption_and_newline(llama_tokenizer):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a dog on grass"}]
    out = tokenize_conversation(conv, llama_tokenizer, "plain")
    assert out["input_ids"][:2] == [1, IMG]
    assert out["labels"][:2] == [IGN, IGN] and all(t != IGN for t in out["labels"][2:])
    assert llama_tokenizer.decode(out["input_ids"][2:]).strip() == "a dog on grass"


@pytest.mark.parametrize("template", ["chatml", "hf"])
def test_chatml_and_hf_chat_template_on_bpe(smollm_tokenizer, template):
    out = tokenize_conversation(CONV, smollm_tokenizer, template)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.count(IMG) == 1
    learned = _learned_text(smollm_tokenizer, out)
    assert learned.startswith("A red cube.<|im_end|>") and "Small.<|im_end|>" in learned
    assert "user" not in learned and "What is" not in learned
    # token by token: each learned run is exactly a reply and its end-of-turn token
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGN:
            cur.append(t)
        elif cur:
            runs.append(smollm_tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(smollm_tokenizer.decode(cur))
    assert [r.strip() for r in runs][:2] == ["A red cube.<|im_end|>", "Small.<|im_end|>"]


def test_llama3_template_adds_no_second_bos(llama_tokenizer):
    """The llama3 text starts with its own <|begin_of_text|>; the tokenizer's BOS is not added on
    top (the original's double BOS)."""
    tok = copy.deepcopy(llama_tokenizer)  # with Llama-3's header tokens as special tokens
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    out = tokenize_conversation(CONV, tok, "llama3")
    assert out["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.bos_token_id not in out["input_ids"]
    assert _learned_text(tok, out).replace(" ", "") == "Aredcube.<|eot_id|>Small.<|eot_id|>"


def test_image_normalisation_and_counts():
    tpl = get_template("vicuna_v1")
    turns = normalize_turns([{"from": "human", "value": "Look: <image> what?"}, {"from": "gpt", "value": "x"}], 1, tpl)
    assert turns[0] == ("user", "<image>\nLook:  what?")
    turns = normalize_turns([{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}], 1, tpl)
    assert turns[0][1] == "<image>\nno placeholder"  # prepended, as the original does
    two = [{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "same"}]
    assert normalize_turns(two, 2, tpl)[0][1] == "<image> vs <image>?"  # order kept
    with pytest.raises(DataError) as e:
        normalize_turns(two, 1, tpl)
    assert e.value.reason == "image_count_mismatch"
    with pytest.raises(DataError) as e:
        normalize_turns([{"from": "gpt", "value": "hi"}], 0, tpl)
    assert e.value.reason == "bad_roles"
    with pytest.raises(DataError) as e:
        normalize_turns([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], 0, tpl)
    assert e.value.reason == "bad_roles"


def test_truncation_counts_image_rows(llama_tokenizer):
    full = tokenize_conversation(CONV, llama_tokenizer, "vicuna_v1", image_tokens=16)
    rows = sequence_length(full["input_ids"], 16)
    assert rows == len(full["input_ids"]) - 1 + 16
    cut = tokenize_conversation(CONV, llama_tokenizer, "vicuna_v1", max_length=rows - 3, image_tokens=16)
    assert len(cut["input_ids"]) == len(full["input_ids"]) - 3
    with pytest.raises(DataError) as e:  # the image alone does not fit
        tokenize_conversation(CONV, llama_tokenizer, "vicuna_v1", max_length=20, image_tokens=64)
    assert e.value.reason == "too_long"
    n_prompt = full["labels"].index(next(t for t in full["labels"] if t != IGN))
    with pytest.raises(DataError) as e:  # the first reply would be cut entirely
        tokenize_conversation(CONV, llama_tokenizer, "vicuna_v1", max_length=n_prompt - 1 + 16, image_tokens=16)
    assert e.value.reason == "too_long"
    with pytest.raises(DataError) as e:
        tokenize_conversation([{"from": "human", "value": "<image> hello?"}], llama_tokenizer)  # no reply
    assert e.value.reason == "no_supervised_tokens"


def test_bpe_ids_equal_the_original_chunked_tokenization(smollm_tokenizer):
    """GPT-2-style BPE: the ids are the tokenizer's own on each <image> chunk of the rendered text."""
    out = tokenize_conversation(CONV, smollm_tokenizer, "chatml")
    text = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the picture?"
        "<|im_end|><|im_start|>assistant\nA red cube.<|im_end|><|im_start|>user\nAnd its size?<|im_end|>"
        "<|im_start|>assistant\nSmall.<|im_end|>"
    )
    want = []
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            want.append(IMG)
        want += smollm_tokenizer(chunk, add_special_tokens=k == 0)["input_ids"]
    assert out["input_ids"] == want
