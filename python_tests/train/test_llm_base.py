"""Training from a plain LLM checkpoint: its weights are kept, the experts and projector are new and
shaped by the recipe's preset (tiny experts for a tiny recipe), and the tokenizer is the LLM's."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eagle_fast.model import presets
from eagle_fast.train.builders import build_model, build_tokenizer, builtin_tokenizer_dir
from eagle_fast.train.config import recipe


def test_llm_base_gets_the_presets_vision_side(tmp_path):
    tok_dir = builtin_tokenizer_dir(str(tmp_path))
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path / "llm")
    cfg = recipe("tiny-x5", "sft", output_dir=str(tmp_path / "run"), model_name_or_path=str(tmp_path / "llm"))
    tok = build_tokenizer(cfg)
    model, proc = build_model(cfg, tok)
    tiny = presets.PRESETS["eagle-tiny-x5"]
    assert model.config.mm_grid == tiny["mm_grid"] and model.config.mm_expert_configs == tiny["mm_expert_configs"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, llm.model.layers[1].mlp.down_proj.weight)
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) < 300_000  # tiny experts, not official


def test_new_experts_on_an_llm_start_initialized_and_saved_values_load(tmp_path):
    """transformers builds the model on the meta device and initializes only what the checkpoint
    lacks: the new ConvNeXt's layer scales get their configured initial value (not leftover memory),
    and a saved Eagle checkpoint's trained values are loaded, not re-initialized."""
    from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM

    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    demo = presets.PRESETS["eagle-demo"]
    eagle = EagleLlamaConfig(
        **{
            **llm.config.to_dict(),
            **{k: demo[k] for k in ("mm_vision_tower", "mm_grid", "image_size", "mm_expert_configs")},
            "model_type": "eagle_llama",
        }
    )
    model = EagleLlamaForCausalLM.from_pretrained(tmp_path / "llm", config=eagle)
    (convnext,) = [e for e in model.model.vision_tower.vision_towers if e.spec.name == "convnext-1024"]
    scales = [b.weight for st in convnext.vision_tower.stages for b in st.blocks]
    want = demo["mm_expert_configs"]["convnext-1024"]["layer_scale_init"]
    assert scales and all(torch.equal(s, torch.full_like(s, want)) for s in scales)
    with torch.no_grad():
        for k, s in enumerate(scales):
            s.fill_(0.25 + k)
    model.save_pretrained(tmp_path / "eagle")
    again = EagleLlamaForCausalLM.from_pretrained(tmp_path / "eagle")
    (convnext,) = [e for e in again.model.vision_tower.vision_towers if e.spec.name == "convnext-1024"]
    got = [b.weight for st in convnext.vision_tower.stages for b in st.blocks]
    assert all(torch.equal(g, torch.full_like(g, 0.25 + k)) for k, g in enumerate(got))
