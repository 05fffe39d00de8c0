"""Word-level tokenizers built from the data: exact round trips (of the lowercased text by
default), stable ids across save/load and rebuilds, offsets that give encode_prompt / tokenize_conversation the right label masks, <unk> for
what the data never held."""

import json

import pytest

from eagle_fast.data.templates import get_template
from eagle_fast.data.tokenize import IMAGE_TOKEN, encode_prompt, tokenize_conversation
from eagle_fast.data.vocab import (
    BOS,
    EOS,
    RENDERED,
    UNK,
    read_records,
    rendered_texts,
    template_markers,
    words_tokenizer,
    words_tokenizer_dir,
)
from eagle_fast.model.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from eagle_fast.data.easy_vqa import easy_vqa_dataset

    return easy_vqa_dataset(tmp_path_factory.mktemp("easyvqa"), max_train_images=40, max_eval_images=10)


@pytest.fixture(scope="module")
def records(built):
    return read_records([built.pretrain, built.sft])


@pytest.fixture(scope="module")
def tok(records):
    return words_tokenizer(rendered_texts(records))


def test_special_ids_and_small_vocabulary(tok):
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == [UNK, BOS, EOS]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.is_fast and len(tok) < 200
    for marker in template_markers():  # one token each, never split
        assert tok(marker, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(marker)]
    assert tok("what is the shape?")["input_ids"][0] == tok.bos_token_id
    assert tok("what is the shape?", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_every_message_round_trips_exactly(tok, records):
    exact = words_tokenizer(rendered_texts(records), lowercase=False)
    for rec in records:
        for msg in rec["conversations"]:
            for chunk in msg["value"].split(IMAGE_TOKEN):
                ids = tok(chunk, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, chunk
                assert tok.decode(ids) == chunk.lower()
                assert exact.decode(exact(chunk, add_special_tokens=False)["input_ids"]) == chunk


def test_capitals_read_as_the_data_words(tok):
    assert tok("What Shape is in the IMAGE?")["input_ids"] == tok("what shape is in the image?")["input_ids"]
    assert tok.unk_token_id not in tok("What color is the shape?")["input_ids"]


@pytest.mark.parametrize("template", RENDERED)
def test_rendered_prompts_have_no_unknown_pieces(tok, records, template):
    tpl = get_template(template)
    for text in rendered_texts(records, [template]):
        ids, _ = encode_prompt(text, tok, tpl.adds_bos)
        assert tok.unk_token_id not in ids, text
        assert (
            tok.decode([i for i in ids if i != IMAGE_TOKEN_INDEX], skip_special_tokens=False).removeprefix(BOS)
            == text.replace(IMAGE_TOKEN, "").lower()
        )


def test_unknown_words_become_unk(tok):
    text = "what is the zebra shape, Ünïcode?"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks.count(UNK) >= 2 and "Ġshape" in toks
    # offsets still cover the text: each <unk> spans its word
    spans = [text[a:b] for a, b in enc["offset_mapping"]]
    assert " zebra" in spans and "".join(spans) == text


def test_save_load_gives_identical_ids(tok, tmp_path, records):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert (again.pad_token, again.bos_token, again.eos_token, again.unk_token) == (UNK, BOS, EOS, UNK)
    for text in rendered_texts(records[:10]):
        assert encode_prompt(text, again) == encode_prompt(text, tok)


def test_vocabulary_is_a_function_of_the_text(records):
    texts = rendered_texts(records)
    assert words_tokenizer(texts).get_vocab() == words_tokenizer(list(reversed(texts))).get_vocab()
    rare = words_tokenizer(texts + ["platypus"])
    assert (
        "platypus" in rare.get_vocab()
        and "platypus" not in words_tokenizer(texts + ["platypus"], min_count=2).get_vocab()
    )


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_label_masks_learn_exactly_the_answers(tok, records, template):
    rec = next(r for r in records if len(r["conversations"]) >= 6)
    out = tokenize_conversation(rec["conversations"], tok, template)
    assert out["input_ids"].count(IMAGE_TOKEN_INDEX) == 1
    learned = [t for t in out["labels"] if t != IGNORE_INDEX]
    stop = get_template(template).sep2 or get_template(template).sep
    answers = [m["value"] for m in rec["conversations"][1::2]]
    assert tok.decode(learned).replace(" ", "") == "".join(a + stop for a in answers)
    assert learned.count(tok.convert_tokens_to_ids(stop)) == len(answers)


def test_tokenizer_dir_is_reused_and_rebuilt(tmp_path, records):
    texts = rendered_texts(records)
    folder = words_tokenizer_dir(tmp_path / "tok", texts)
    stamp = (tmp_path / "tok" / "tokenizer.json").stat().st_mtime_ns
    assert words_tokenizer_dir(folder, texts) == folder
    assert (tmp_path / "tok" / "tokenizer.json").stat().st_mtime_ns == stamp  # same vocabulary: kept
    words_tokenizer_dir(folder, texts + ["platypus"])
    with open(tmp_path / "tok" / "tokenizer.json") as f:
        assert "platypus" in json.load(f)["model"]["vocab"]
    words_tokenizer_dir(folder, texts + ["platypus"], lowercase=False)  # same words, another normalizer
    with open(tmp_path / "tok" / "tokenizer.json") as f:
        assert json.load(f)["normalizer"] is None


def test_records_from_json_lists(tmp_path, records):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records[:3]))
    assert read_records([path]) == records[:3]
