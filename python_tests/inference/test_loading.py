"""load_model: saved directories round-trip, mismatched checkpoints name their keys, legacy buffers
are ignored, LoRA adapter directories load merged (base from the adapter or given), presets."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_fast.inference import load_model
from eagle_fast.vision.processor import EagleImageProcessor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, tok, proc = load_model("eagle-tiny-x4")
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model, tok


def _logits(model):
    ids = torch.tensor([[1, 330, 1179, 523]])
    with torch.no_grad():
        return model(ids).logits


def test_directory_round_trip(saved):
    path, model, tok0 = saved
    again, tok, proc = load_model(str(path))
    assert torch.equal(_logits(again), _logits(model))
    img = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    want = EagleImageProcessor.from_model_config(model.config)([img])
    assert tok.pad_token is not None and torch.equal(proc([img])["pixel_values"], want["pixel_values"])
    # the saved tokenizer splits text after a special token as the original did ("</s>USER")
    text = "hi</s>USER: what?"
    assert tok(text)["input_ids"] == tok0(text)["input_ids"] == [1, 12014, 2, 2223, 725, 28747, 767, 28804]


def _edited_copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    path, _, _ = saved
    gone = "model.mm_projector.0.weight"
    bad = _edited_copy(path, tmp_path / "missing", lambda s: s.pop(gone))
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): " + gone.replace(".", r"\.")):
        load_model(str(bad))
    extra = _edited_copy(path, tmp_path / "extra", lambda s: s.update({"model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): model\.extra_head\.weight"):
        load_model(str(extra))
    # buffers older exports stored (rotary inv_freq) are not errors
    legacy = _edited_copy(
        path, tmp_path / "legacy", lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    )
    load_model(str(legacy))


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a preset"):
        load_model("no-such-model")


def test_lora_adapter_directory_loads_merged(saved, tmp_path):
    from eagle_fast.train.config import TrainConfig
    from eagle_fast.train.lora import apply_lora, save_lora

    path, _, _ = saved
    base, _, _ = load_model(str(path))
    peft_model = apply_lora(base, TrainConfig(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "mm_projector" in n:
                p.add_(torch.randn_like(p) * 0.05)  # an adapter and projector that change the output
    want = _logits(peft_model)
    adapter = tmp_path / "adapter"
    save_lora(peft_model, str(adapter))
    load_model(str(path))[1].save_pretrained(adapter)
    load_model(str(path))[2].save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    merged, _, _ = load_model(str(adapter))
    assert type(merged).__name__ == "EagleLlamaForCausalLM"
    assert (_logits(merged) - want).abs().max() < 1e-5
    assert (_logits(load_model(str(path))[0]) - want).abs().max() > 1e-3  # the adapter mattered
    # a base that moved: named explicitly, or a clear error
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/gone"}))
    with pytest.raises(FileNotFoundError, match="pass base=DIR"):
        load_model(str(adapter))
    assert (_logits(load_model(str(adapter), base=str(path))[0]) - want).abs().max() < 1e-5


def test_mid_size_preset_has_the_official_grid():
    model, _, proc = load_model("eagle-small-x5")
    img = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    with torch.no_grad():
        feats = model.encode_images(proc([img]))
    assert feats.shape == (1, 32 * 32, model.config.hidden_size) and torch.isfinite(feats).all()
