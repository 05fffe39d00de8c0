"""The demo recipe: eagle-demo (two experts at their own resolutions, channel-concat fusion,
mlp2x_gelu, a small Llama) with the word-level tokenizer built from the built-in easy-VQA records,
the same for both stages; the two-stage CLI chain runs as written in the recipe."""

import json
import os

import pytest
import torch

from eagle_fast.model import presets
from eagle_fast.train.__main__ import main, parse
from eagle_fast.train.builders import build_model, build_tokenizer
from eagle_fast.train.config import DATA_WORDS, recipe

pytest.importorskip("easy_vqa")


def test_demo_preset_keeps_the_eagle_architecture():
    cfg = presets.get("eagle-demo")
    experts = cfg.mm_vision_tower.split(";")
    assert len(experts) >= 2 and cfg.mm_projector_type == "mlp2x_gelu"
    sizes = {n: cfg.mm_expert_configs[n]["image_size"] for n in experts}
    assert len(set(sizes.values())) == len(sizes), sizes  # each expert at its own input resolution
    counts = presets.parameter_counts("eagle-demo")
    assert counts["total"] < 2_000_000 and all(counts[n] > 0 for n in experts)


def test_demo_recipe_stages():
    pre, sft = recipe("demo", "pretrain"), recipe("demo", "sft")
    assert pre.preset == sft.preset == "eagle-demo"
    assert pre.tokenizer_name_or_path == sft.tokenizer_name_or_path == DATA_WORDS
    assert pre.version == "plain" and sft.version == "chatml"
    assert pre.data_path is None and sft.data_path is None  # the built-in easy-VQA set
    cli = parse(
        ["--recipe", "demo", "--stage", "sft", "--pretrain_mm_mlp_adapter", "d1/mm_projector.bin", "--output_dir", "d2"]
    )
    assert cli == sft.replace(pretrain_mm_mlp_adapter="d1/mm_projector.bin", output_dir="d2")


def test_both_stages_build_the_same_small_tokenizer(tmp_path):
    toks = [build_tokenizer(recipe("demo", stage, output_dir=str(tmp_path / stage))) for stage in ("pretrain", "sft")]
    assert toks[0].get_vocab() == toks[1].get_vocab()
    assert len(toks[0]) < 200 and toks[0].pad_token_id == 0 and toks[0].eos_token_id == 2
    model, processor = build_model(recipe("demo", "sft", output_dir=str(tmp_path / "sft")), toks[1])
    assert model.config.vocab_size == len(toks[1])
    assert model.lm_head.weight.shape[0] == len(toks[1])


def test_data_words_needs_data_on_other_recipes(tmp_path):
    with pytest.raises(ValueError, match="needs data_path"):
        build_tokenizer(recipe("eagle-x5-7b", "sft", output_dir=str(tmp_path), tokenizer_name_or_path=DATA_WORDS))


def test_two_stage_chain_runs_from_the_cli(tmp_path):
    d1, d2 = str(tmp_path / "d1"), str(tmp_path / "d2")
    assert main(["--recipe", "demo", "--stage", "pretrain", "--output_dir", d1, "--max_steps", "2"]) == 0
    adapter = os.path.join(d1, "mm_projector.bin")
    assert (
        main(
            [
                "--recipe",
                "demo",
                "--stage",
                "sft",
                "--pretrain_mm_mlp_adapter",
                adapter,
                "--output_dir",
                d2,
                "--max_steps",
                "2",
            ]
        )
        == 0
    )
    with (
        open(os.path.join(d1, "final", "tokenizer.json")) as f1,
        open(os.path.join(d2, "final", "tokenizer.json")) as f2,
    ):
        assert json.load(f1)["model"]["vocab"] == json.load(f2)["model"]["vocab"]
    from safetensors.torch import load_file

    state = load_file(os.path.join(d2, "final", "model.safetensors"))
    stage1 = torch.load(adapter, weights_only=True)
    assert set(stage1) <= set(state) and stage1  # the projector the sft stage started from, same keys
    from eagle_fast.inference import load_model

    model, tok, processor = load_model(os.path.join(d2, "final"), device="cpu")
    assert len(tok) == model.config.vocab_size and processor.experts == model.config.mm_vision_tower.split(";")
