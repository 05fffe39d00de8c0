"""EagleLlamaForCausalLM on the tiny presets: mixture against the original algorithm, splice edge
cases, official key layout of every full preset (meta device), save / reload through
AutoModelForCausalLM, fast path vs reference ops, generation, training steps."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from eagle_fast import EagleImageProcessor
from eagle_fast.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, EagleLlamaForCausalLM, presets
from eagle_fast.model.projector import build_projector
from eagle_fast.model.splice import splice

IMG = IMAGE_TOKEN_INDEX


def _model(name="eagle-tiny-x5", seed=0):
    torch.manual_seed(seed)
    return EagleLlamaForCausalLM(presets.get(name)).eval()


def _processor(model):
    return EagleImageProcessor.from_model_config(model.config)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (40 + 7 * i, 60 - 5 * i, 3), dtype=torch.uint8, generator=g) for i in range(n)]


def test_mixture_equals_the_original_algorithm():
    """Per expert: its map, pixel-unshuffled (SAM) and bilinear align_corners=True in fp32 to the
    grid, flattened row-major, concatenated on channels in mixture order."""
    model = _model()
    images = _processor(model)(_images(2))
    mixture = model.model.vision_tower
    maps = mixture.expert_maps(images)
    parts = []
    for expert, m in zip(mixture.vision_towers, maps):
        assert m.dim() == 4 and m.shape[1] * expert.spec.unshuffle**2 == expert.hidden_size
        if expert.spec.unshuffle > 1:
            m = F.pixel_unshuffle(m, expert.spec.unshuffle)
        m = F.interpolate(m.float(), size=(4, 4), mode="bilinear", align_corners=True)
        parts.append(m.flatten(2).transpose(1, 2))
    want = torch.cat(parts, dim=-1)
    got = mixture(images)
    assert got.shape == (2, 16, model.config.mm_hidden_size) == want.shape
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("order", ["pix2struct-1024;clip-448", "det-1024", "sam-1024;det-1024;clip-448"])
def test_any_subset_and_order_of_experts(order):
    cfg = presets.get(
        "eagle-tiny-x5", mm_vision_tower=order, mm_expert_configs={n: presets.TINY_EXPERTS[n] for n in order.split(";")}
    )
    model = EagleLlamaForCausalLM(cfg).eval()
    assert model.model.vision_tower.names == order.split(";")
    feats = model.encode_images(_processor(model)(_images(1)))
    assert feats.shape == (1, 16, cfg.hidden_size)


def test_projector_types():
    x = torch.randn(3, 10)
    assert build_projector("linear", 10, 6)(x).shape == (3, 6)
    mlp = build_projector("mlp2x_gelu", 10, 6)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"] and mlp(x).shape == (3, 6)
    assert len(build_projector("mlp3x_gelu", 10, 6)) == 5
    assert build_projector("identity", 10, 10)(x) is x
    with pytest.raises(ValueError, match="unknown mm_projector_type"):
        build_projector("qformer", 10, 6)


# ----------------------------------------------------------------------------- splice


def _splice(ids, mask, n_images, t=3, hidden=4):
    emb = torch.nn.Embedding(50, hidden)
    feats = [torch.full((t, hidden), 100.0 + k) for k in range(n_images)]
    labels = ids.clone().masked_fill(ids < 0, IGNORE_INDEX)
    return splice(ids, mask, labels, feats, emb), emb


def test_splice_two_images_end_position_and_text_only_rows():
    ids = torch.tensor([[1, IMG, 5, IMG], [1, 2, 3, 4]])
    s, emb = _splice(ids, None, 2)
    assert s.inputs_embeds.shape == (2, 2 + 2 * 3, 4)
    row = s.inputs_embeds[0]
    assert torch.equal(row[0], emb.weight[1]) and torch.equal(row[4], emb.weight[5])
    assert (row[1:4] == 100).all() and (row[5:8] == 101).all()  # the image at the very end
    assert s.labels[0].tolist() == [1, -100, -100, -100, 5, -100, -100, -100]
    assert s.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # right padding kept
    assert s.labels[1].tolist()[4:] == [IGNORE_INDEX] * 4


def test_splice_left_padding_and_positions():
    ids = torch.tensor([[0, 0, 1, IMG], [1, 2, IMG, 3]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    s, _ = _splice(ids, mask, 2)
    assert s.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert s.position_ids[0].tolist() == [0, 0, 0, 1, 2, 3]
    assert (s.inputs_embeds[0, :2] == 0).all()


def test_splice_count_mismatch_names_the_sample():
    ids = torch.tensor([[1, IMG, 2], [1, IMG, IMG]])
    with pytest.raises(ValueError, match="sample 1 is the first without enough images"):
        _splice(ids, None, 2)
    with pytest.raises(ValueError, match="left over"):
        _splice(ids, None, 4)


# ----------------------------------------------------------------------------- checkpoint layout

FAMILIES = {  # official key families (the NVEagle checkpoint layout), expert keys after the tower prefix
    "llm": r"(model\.(embed_tokens|norm)\.weight|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
    r"|input_layernorm|post_attention_layernorm)\.weight|lm_head\.weight)",
    "projector": r"model\.mm_projector\.[02]\.(weight|bias)",
    "clip-448": r"vision_model\.(embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)"
    r"|pre_layrnorm\.\w+|post_layernorm\.\w+|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn"
    r"\.out_proj|layer_norm[12]|mlp\.fc[12])\.\w+)",
    "convnext-1024": r"(stem\.[01]\.\w+|stages\.\d\.downsample\.[01]\.\w+|stages\.\d\.blocks\.\d+\.(conv_dw\.\w+"
    r"|norm\.\w+|mlp\.fc[12]\.\w+|weight)|head\.(norm|fc)\.\w+)",
    "sam-1024": r"(patch_embed\.projection\.\w+|pos_embed|layers\.\d+\.(layer_norm[12]\.\w+|attn\.(qkv|proj)\.\w+"
    r"|attn\.rel_pos_[hw]|mlp\.lin[12]\.\w+)|neck\.conv1\.weight|neck\.layer_norm1\.\w+)",
    "det-1024": r"(patch_embed\.proj\.\w+|pos_embed|blocks\.\d+\.(norm[12]\.\w+|attn\.[qkv]_proj\.weight"
    r"|attn\.[qv]_bias|attn\.proj\.\w+|mlp\.(w[123]|ffn_ln)\.\w+))",
    "pix2struct-1024": r"(embeddings\.(patch_projection|row_embedder|column_embedder)\.\w+|encoder\.layer\.\d+\."
    r"(pre_attention_layer_norm|pre_mlp_layer_norm)\.weight|encoder\.layer\.\d+\.attention\."
    r"(query|key|value|output)\.weight|encoder\.layer\.\d+\.mlp\.(wi_0|wi_1|wo)\.weight"
    r"|layernorm\.weight)",
}
LAYERS = {
    "clip-448": (r"vision_model\.encoder\.layers\.(\d+)\.", 24),
    "convnext-1024": (r"stages\.2\.blocks\.(\d+)\.", 30),
    "sam-1024": (r"layers\.(\d+)\.", 24),
    "det-1024": (r"blocks\.(\d+)\.", 24),
    "pix2struct-1024": (r"encoder\.layer\.(\d+)\.", 18),
}


@pytest.mark.parametrize("name", [n for n in presets.PRESETS if not presets.PRESETS[n].get("mm_expert_configs")])
def test_full_presets_have_the_official_key_set(name):
    cfg = presets.get(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == "EagleLlamaForCausalLM"
    keys = dict(model.state_dict())
    experts = cfg.mm_vision_tower.split(";")
    seen = {k: 0 for k in ["llm", "projector", *experts]}
    for key in keys:
        m = re.match(r"model\.vision_tower\.vision_towers\.(\d+)\.vision_tower\.(.+)", key)
        if m:
            expert = experts[int(m[1])]
            assert re.fullmatch(FAMILIES[expert], m[2]), f"{name}: unexpected key {key}"
            seen[expert] += 1
        else:
            family = "projector" if "mm_projector" in key else "llm"
            assert re.fullmatch(FAMILIES[family], key), f"{name}: unexpected key {key}"
            seen[family] += 1
    assert all(seen.values()), seen
    for k, expert in enumerate(experts):
        pattern, n = LAYERS[expert]
        layers = {
            int(m[1]) for key in keys for m in [re.search(rf"vision_towers\.{k}\.vision_tower\.{pattern}", key)] if m
        }
        assert layers == set(range(n)), expert
    assert keys["model.mm_projector.0.weight"].shape == (cfg.hidden_size, cfg.mm_hidden_size)
    assert cfg.mm_hidden_size == {5: 7680, 4: 6656}[len(experts)]
    assert (
        len([k for k in keys if re.fullmatch(r"model\.layers\.\d+\.input_layernorm\.weight", k)])
        == cfg.num_hidden_layers
    )


# ----------------------------------------------------------------------------- model behaviour


def _batch(model, n_rows=2):
    images = _processor(model)(_images(3))
    ids = torch.tensor([[1, 7, IMG, 9, 10, 11, 12], [0, 1, IMG, 5, IMG, 6, 7], [1, 2, 3, 4, 5, 6, 7]])[: n_rows + 1]
    mask = torch.tensor([[1] * 7, [0, 1, 1, 1, 1, 1, 1], [1] * 7])[: n_rows + 1]
    labels = ids.clamp(min=0).masked_fill(mask == 0, IGNORE_INDEX)
    return ids, mask, labels, images


def test_fast_path_equals_reference_ops_logits_and_gradients():
    model = _model()
    ids, mask, labels, images = _batch(model)
    fast = model(ids, mask, labels=labels, images=images)
    fast.loss.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = model(ids, mask, labels=labels, images=images, reference=True)
    ref.loss.backward()
    assert model.config._attn_implementation == "eagle_attention"  # the LLM runs on ops.attention
    assert fast.logits.shape == (3, 6 - 2 + 2 * 16, model.config.vocab_size)  # row 1: 6 tokens, 2 images
    assert (fast.logits - ref.logits).abs().max() < 1e-4
    assert any("vision_towers.4" in n for n in g_fast)  # gradients reach the experts
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (g_fast[n] - p.grad).abs().max() <= 1e-4 * max(1.0, p.grad.abs().max().item()), n


def test_training_loss_uses_the_fused_head_and_equals_reference_ops():
    """Train mode with labels: the loss comes from ops.linear_cross_entropy on the learned rows only
    (logits None); it and every parameter gradient equal the reference path (lm_head over every row +
    F.cross_entropy), with and without num_items_in_batch."""
    model = _model().train()
    ids, mask, labels, images = _batch(model)
    labels[:, :3] = IGNORE_INDEX  # prompt tokens (and the image rows spliced in) are not learned
    losses = []
    for kw in ({}, {"num_items_in_batch": torch.tensor(11)}):
        model.zero_grad()
        fast = model(ids, mask, labels=labels, images=images, **kw)
        fast.loss.backward()
        g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        ref = model(ids, mask, labels=labels, images=images, reference=True, **kw)
        ref.loss.backward()
        assert fast.logits is None and ref.logits is None
        assert abs(fast.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))
        assert "lm_head.weight" in g_fast and any("vision_towers.4" in n for n in g_fast)
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert (g_fast[n] - p.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item()), n
        losses.append(fast.loss.item())
    model.eval()
    with torch.no_grad():  # eval mode keeps the HF path: logits, and the same mean loss
        out = model(ids, mask, labels=labels, images=images)
    assert out.logits is not None and abs(out.loss.item() - losses[0]) <= 1e-5 * max(1.0, losses[0])


def test_text_only_batch_skips_the_vision_experts():
    model = _model()
    calls = []
    for e in model.model.vision_tower.vision_towers:
        e.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, 4, model.config.vocab_size) and not calls
    with pytest.raises(ValueError, match="image placeholder"):
        model(torch.tensor([[1, IMG, 3]]))


def test_generate_greedy_and_sampling_with_an_image():
    model = _model()
    proc = _processor(model)
    prompt = torch.tensor([[1, IMG, 5, 6]])
    greedy = model.generate(prompt, images=proc(_images(1)), max_new_tokens=6, do_sample=False)
    again = model.generate(prompt, images=proc(_images(1)), max_new_tokens=6, do_sample=False)
    assert greedy.shape == (1, 6) and torch.equal(greedy, again)
    # the first greedy token is the argmax of the forward pass
    logits = model(prompt, images=proc(_images(1))).logits
    assert greedy[0, 0] == logits[0, -1].argmax()
    torch.manual_seed(0)
    sampled = model.generate(
        prompt, images=proc(_images(1)), max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9
    )
    assert sampled.shape == (1, 6)
    text_only = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert text_only.shape == (1, 6)  # prompt + new tokens, as HF does for input_ids


def test_sharded_checkpoint_with_official_config_reloads(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "eagle_llama" and cfg["architectures"] == ["EagleLlamaForCausalLM"]
    cfg.update(
        transformers_version="4.37.2", torch_dtype="bfloat16", mm_vision_tower_lr=None, unfreeze_mm_vision_tower=True
    )  # fields of the original writer we do not use
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors.index_old.json").write_text("{broken")  # stray files of some repos
    (tmp_path / (shards[0].replace(".safetensors", "_old.safetensors"))).write_bytes(b"junk")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is EagleLlamaForCausalLM
    proc = EagleImageProcessor.from_pretrained(tmp_path)  # from config.json alone
    assert proc.config == _processor(model).config
    ids, mask, labels, images = _batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, images=images).logits, model(ids, mask, images=images).logits)


def test_loss_decreases_on_a_fixed_batch():
    model = _model().train()
    ids, mask, labels, images = _batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(ids, mask, labels=labels, images=images).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_splice_inputs_takes_processor_output_or_the_projected_features_it_gives():
    """An encoder cache hands the model the features encode_images computed earlier: the splice
    must be the same."""
    model = _model()
    ids, mask, _, images = _batch(model)
    with torch.no_grad():
        a = model.splice_inputs(ids, mask, None, images)
        b = model.splice_inputs(ids, mask, None, model.encode_images(images))
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)
