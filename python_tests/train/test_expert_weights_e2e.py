"""Stage 1 as Eagle starts it: a (tiny) Llama checkpoint plus the five experts' released weights
(toy-size checkpoints in their native layouts), the projector alone trained and written as
mm_projector.bin, which stage 2 — built the same way — loads."""

import json

import pytest
import torch

from eagle_fast.train.__main__ import parse
from eagle_fast.train.loop import Trainer
from python_tests.vision.toy_checkpoints import clip_model, eva_vitdet_state, pix2struct_model, sam_model, timm_convnext


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The five native checkpoints on disk, and the native modules they came from."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("native")
    native = {
        "clip": clip_model(),
        "convnext": timm_convnext(),
        "sam": sam_model(),
        "p2s": pix2struct_model(),
        "eva": eva_vitdet_state(),
    }
    native["clip"].save_pretrained(root / "clip")
    (root / "convnext").mkdir()
    save_file(
        {k: v.contiguous() for k, v in native["convnext"].state_dict().items()},
        str(root / "convnext" / "model.safetensors"),
    )
    native["sam"].save_pretrained(root / "sam")
    native["p2s"].save_pretrained(root / "p2s")
    torch.save({"ema_state": native["eva"], "iteration": 10}, root / "eva.pth")
    spec = (
        f"clip-448={root / 'clip'};convnext-1024={root / 'convnext'};sam-1024={root / 'sam'};"
        f"det-1024={root / 'eva.pth'};pix2struct-1024={root / 'p2s'}"
    )
    return spec, native


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A Llama checkpoint (random, tiny) with the built-in Llama SentencePiece tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from eagle_fast.train.builders import builtin_tokenizer_dir

    root = tmp_path_factory.mktemp("llm")
    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir(str(root / "assets")))
    torch.manual_seed(3)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    )
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root / "llm", llm


def _expert(model, name):
    mixture = model.model.vision_tower
    return mixture.vision_towers[mixture.names.index(name)]


def test_stage1_starts_from_the_llm_and_the_released_experts_and_stage2_loads_its_projector(
    tmp_path, small_data, sources, tiny_llm
):
    spec, native = sources
    llm_dir, llm = tiny_llm
    _, images, pretrain = small_data
    common = [
        "--recipe",
        "tiny-x5",
        "--model_name_or_path",
        str(llm_dir),
        "--vision_tower_weights",
        spec,
        "--image_folder",
        images,
        "--max_steps",
        "2",
        "--save_steps",
        "0",
        "--model_max_length",
        "96",
    ]
    stage1 = Trainer(
        parse(common + ["--stage", "pretrain", "--data_path", pretrain, "--output_dir", str(tmp_path / "s1")])
    )
    m = stage1.model
    # the LLM as saved, every expert as released (Eagle's key for each native one)
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(m.lm_head.weight, llm.lm_head.weight)
    clip = _expert(m, "clip-448").vision_tower.vision_model
    assert torch.equal(
        clip.encoder.layers[1].mlp.fc1.weight, native["clip"].vision_model.encoder.layers[1].mlp.fc1.weight
    )
    convnext = _expert(m, "convnext-1024").vision_tower
    assert torch.equal(convnext.stages[3].blocks[0].weight, native["convnext"].stages[3].blocks[0].gamma)
    sam = _expert(m, "sam-1024").vision_tower
    assert torch.equal(sam.layers[1].attn.qkv.weight, native["sam"].vision_encoder.layers[1].attn.qkv.weight)
    # SAM's pretrained neck has the names and shapes of Eagle's new one, and is never loaded
    assert sam.neck.conv1.weight.shape == native["sam"].vision_encoder.neck.conv1.weight.shape
    assert not torch.equal(sam.neck.conv1.weight, native["sam"].vision_encoder.neck.conv1.weight)
    eva = _expert(m, "det-1024").vision_tower
    assert torch.equal(eva.blocks[2].attn.q_proj.weight, native["eva"]["backbone.net.blocks.2.attn.q_proj.weight"])
    p2s = _expert(m, "pix2struct-1024").vision_tower
    assert torch.equal(
        p2s.encoder.layer[0].attention.query.weight, native["p2s"].encoder.encoder.layer[0].attention.query.weight
    )
    # the assembled model computes what the same weights in a plainly built model compute: nothing
    # outside the state dict (EVA's RoPE tables, buffers) left unset by the meta-device build
    from eagle_fast.model import EagleLlamaForCausalLM

    plain = EagleLlamaForCausalLM(m.config)
    plain.load_state_dict(m.state_dict())
    batch = stage1.collate([stage1.dataset[0]])
    with torch.no_grad():
        assert torch.equal(m.eval().encode_images(batch["images"]), plain.eval().encode_images(batch["images"]))
    stage1.model.train()
    stage1.train()

    saved = json.loads((tmp_path / "s1" / "final" / "config.json").read_text())["mm_vision_tower_sources"]
    assert set(saved) == {"clip-448", "convnext-1024", "sam-1024", "det-1024", "pix2struct-1024"}
    assert all(len(r["sha256"]) == 64 for r in saved.values())
    assert sorted(saved["sam-1024"]["new"]) == [
        "vision_tower.neck.conv1.weight",
        "vision_tower.neck.layer_norm1.bias",
        "vision_tower.neck.layer_norm1.weight",
    ]
    bin_path = tmp_path / "s1" / "mm_projector.bin"
    projector = torch.load(bin_path, weights_only=True)

    stage2 = Trainer(
        parse(
            common
            + [
                "--stage",
                "sft",
                "--data_path",
                small_data[0],
                "--pretrain_mm_mlp_adapter",
                str(bin_path),
                "--output_dir",
                str(tmp_path / "s2"),
            ]
        )
    )
    got = stage2.model.model.mm_projector.state_dict()
    assert got.keys() and all(torch.equal(got[k], projector[f"model.mm_projector.{k}"]) for k in got)
    assert torch.equal(
        _expert(stage2.model, "clip-448").vision_tower.vision_model.encoder.layers[1].mlp.fc1.weight,
        native["clip"].vision_model.encoder.layers[1].mlp.fc1.weight,
    )


def test_prealign_takes_its_one_expert_from_the_same_sources(tmp_path, small_data, sources, tiny_llm, capsys):
    spec, native = sources
    llm_dir, _ = tiny_llm
    data, images, _ = small_data
    t = Trainer(
        parse(
            [
                "--recipe",
                "tiny-x5",
                "--stage",
                "prealign",
                "--vision_tower",
                "sam-1024",
                "--model_name_or_path",
                str(llm_dir),
                "--vision_tower_weights",
                spec,
                "--data_path",
                data,
                "--image_folder",
                images,
                "--max_steps",
                "1",
                "--output_dir",
                str(tmp_path),
            ]
        )
    )
    assert t.model.model.vision_tower.names == ["sam-1024"]
    sam = t.model.model.vision_tower.vision_towers[0].vision_tower
    assert torch.equal(sam.layers[0].mlp.lin1.weight, native["sam"].vision_encoder.layers[0].mlp.lin1.weight)
    out = capsys.readouterr().out
    assert "sam-1024: " in out and "loaded" in out
    assert "clip-448, convnext-1024, det-1024, pix2struct-1024 not in this mixture" in out


def test_an_eagle_checkpoint_keeps_its_experts_and_says_the_sources_are_unused(tmp_path, small_data, sources, capsys):
    from eagle_fast.train.checkpoint import write_model

    data, images, _ = small_data
    base = ["--recipe", "tiny-x5", "--data_path", data, "--image_folder", images, "--max_steps", "1"]
    t = Trainer(parse(base + ["--output_dir", str(tmp_path / "a")]))
    write_model(t.model, str(tmp_path / "ckpt"), savers=(t.tokenizer, t.processor))
    u = Trainer(
        parse(
            base
            + [
                "--output_dir",
                str(tmp_path / "b"),
                "--model_name_or_path",
                str(tmp_path / "ckpt"),
                "--vision_tower_weights",
                sources[0],
            ]
        )
    )
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), u.model.state_dict().values()))
    assert f"vision_tower_weights: not used, the experts come from {tmp_path / 'ckpt'}" in capsys.readouterr().out
