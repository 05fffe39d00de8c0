"""QLoRA (--bits 4 / 8) on CPU through bitsandbytes + peft: the LLM's LoRA targets become frozen
quantized layers, only LoRA / projector / experts train, the adapter reloads onto a re-quantized
base with the same logits and merges into the full-precision base, and a resumed run is bitwise
equal to an uninterrupted one (the quantized base is rebuilt, not stored)."""

import pytest
import torch

from eagle_fast.data import EagleCollator
from eagle_fast.train.config import recipe
from eagle_fast.train.loop import Trainer

bnb = pytest.importorskip("bitsandbytes")


def _cfg(out, small_data, bits, **kw):
    data, images, _ = small_data
    base = dict(
        output_dir=str(out),
        data_path=data,
        image_folder=images,
        per_device_train_batch_size=4,
        max_steps=3,
        save_steps=0,
        model_max_length=96,
        lora_enable=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-2,
        bits=bits,
    )
    base.update(kw)
    return recipe("tiny-x5", "sft", **base)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits


@pytest.mark.parametrize("bits,layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_trains_adapters_on_a_quantized_llm_and_reloads(tmp_path, small_data, bits, layer):
    from transformers import AutoModelForCausalLM

    from eagle_fast.train.lora import load_lora, merge_lora, quantize_llm

    trainer = Trainer(_cfg(tmp_path / "run", small_data, bits))
    base = trainer.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer and not q_proj.base_layer.weight.requires_grad
    assert q_proj.base_layer.weight.dtype in (torch.uint8, torch.int8)  # stored quantized
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("mm_projector" in n for n in trained)
    assert all("lora_" in n or "mm_projector" in n or ".vision_tower." in n for n in trained)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    losses = trainer.train()["losses"]
    assert len(losses) == 3 and all(l == l and l < 50 for l in losses)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)

    trainer.model.eval()
    batch = EagleCollator(trainer.tokenizer.pad_token_id)([trainer.dataset[i] for i in range(2)])  # padded rows
    want = _logits(trainer.model, batch)
    requant = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base")
    quantize_llm(requant, bits)
    again = load_lora(requant, str(tmp_path / "run" / "final")).eval()
    assert torch.allclose(_logits(again, batch), want, atol=1e-5, rtol=0)  # the training-time model exactly
    full = load_lora(
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base"), str(tmp_path / "run" / "final")
    ).eval()
    full_logits = _logits(full, batch)
    merged = merge_lora(
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base"), str(tmp_path / "run" / "final")
    ).eval()
    assert type(merged).__name__ == "EagleLlamaForCausalLM"
    assert (_logits(merged, batch) - full_logits).abs().max() < 1e-4
    # the quantized model is an approximation of the full-precision one, not the same model
    assert 0 < (full_logits - want).abs().max() < 0.5 * want.abs().max()


def test_qlora_resume_is_bitwise_exact(tmp_path, small_data):
    from safetensors.torch import load_file

    from eagle_fast.train.checkpoint import FULL_STATE

    whole = Trainer(_cfg(tmp_path / "whole", small_data, 4, max_steps=4, save_steps=2, save_total_limit=2))
    whole.train()
    ckpt = tmp_path / "whole" / "checkpoint-2"
    saved = load_file(ckpt / FULL_STATE)
    assert any("lora_A" in k for k in saved) and any("mm_projector" in k for k in saved)
    assert not any(".base_layer." in k for k in saved)  # the quantized weights are rebuilt, not stored
    resumed = Trainer(_cfg(tmp_path / "resumed", small_data, 4, max_steps=4, resume=str(ckpt)))
    resumed.train()
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert set(a) == set(b)
    for n, p in a.items():
        assert torch.equal(p, b[n]), n


def test_bits_without_lora_or_with_other_widths_is_refused(tmp_path, small_data):
    with pytest.raises(ValueError, match="lora_enable"):
        _cfg(tmp_path, small_data, 4, lora_enable=False)
    with pytest.raises(ValueError, match="bits=3"):
        _cfg(tmp_path, small_data, 3)
