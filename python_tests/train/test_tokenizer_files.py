"""A trained model's folder keeps its tokenizer's SentencePiece model: transformers 5 saves only
tokenizer.json, and a reload without tokenizer.model would tokenize runs of spaces differently
from training (the converted fast tokenizer), so what the model sees at inference would differ."""

import filecmp
import os

from eagle_fast.data.tokenize import encode_prompt
from eagle_fast.train.builders import TokenizerFiles, build_tokenizer
from eagle_fast.train.config import recipe


def test_saved_tokenizers_carry_their_sentencepiece_model_and_reload_to_the_same_ids(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    tok = build_tokenizer(recipe("tiny-x5", output_dir=str(tmp_path / "run")))
    src = TokenizerFiles(tok).source()
    assert src is not None
    TokenizerFiles(tok).save_pretrained(str(tmp_path / "saved"))
    assert filecmp.cmp(src, tmp_path / "saved" / "tokenizer.model", shallow=False)
    again = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "saved" / "tokenizer.model"))
    for text in ["A  cat.", " A cat.", "x\n\n  y\t3 4"]:
        ids, _ = encode_prompt(text, again, add_bos=False)
        assert ids == encode_prompt(text, tok, add_bos=False)[0] == sp.encode(text), text


def test_a_tokenizer_without_a_sentencepiece_model_saves_as_before(tmp_path):
    from eagle_fast.train.config import DATA_WORDS

    tok = build_tokenizer(recipe("demo", output_dir=str(tmp_path / "run"), tokenizer_name_or_path=DATA_WORDS))
    assert TokenizerFiles(tok).source() is None
    TokenizerFiles(tok).save_pretrained(str(tmp_path / "saved"))
    assert not os.path.exists(tmp_path / "saved" / "tokenizer.model")
