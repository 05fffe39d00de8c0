"""Loading the released encoder weights into the experts, on toy checkpoints laid out as the releases:
each loaded expert against the native library module run Eagle's way, and the loading rules (SAM's
pretrained neck never loaded, ConvNeXt's head may differ, anything else missing or misshapen fails).
The expected key mappings are the original's rules, written out here."""

import pytest
import torch

from eagle_fast.vision.experts import build_expert
from eagle_fast.vision.weights import Conversion, ExpertWeightsError, convert, read_native

from .toy_checkpoints import TINY, clip_model, eva_vitdet_state, pix2struct_model, sam_model, timm_convnext


def _canvas(size, b=2, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_close(got, want):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err


def _load(name, native):
    expert = build_expert(name, TINY[name]).eval()
    conv = convert(name, native, expert)
    missing, unexpected = expert.load_state_dict(conv.state, strict=False)
    assert not unexpected and sorted(missing) == sorted(conv.new + conv.mismatched)
    return expert, conv


# ----------------------------------------------------------------------------- clip-448


def test_clip_from_clip_model_repo_matches_hf_vision_tower_run_eagle_way(tmp_path):
    from transformers import CLIPVisionModel

    clip_model().save_pretrained(tmp_path)
    native = read_native("clip-448", str(tmp_path))  # the repo directory: model.safetensors
    expert, conv = _load("clip-448", native)
    # Eagle's rule: the vision tower `vision_model.X` is `vision_tower.vision_model.X`; the text tower,
    # both projections and logit_scale are not used
    vision = [k for k in native if k.startswith("vision_model.")]
    assert sorted(conv.loaded) == sorted("vision_tower." + k for k in vision)
    assert sorted(conv.unused) == sorted(k for k in native if not k.startswith("vision_model."))
    assert {
        "logit_scale",
        "visual_projection.weight",
        "text_projection.weight",
        "text_model.embeddings.token_embedding.weight",
    } <= set(conv.unused)
    assert conv.new == [] and conv.mismatched == [] and conv.format == "hf-clip"
    assert conv.summary() == f"clip-448: {len(vision)} loaded, 0 new, 0 mismatched, {len(native) - len(vision)} unused"
    assert all(conv.state["vision_tower." + k] is native[k] for k in vision)  # renamed only: no copy, no cast
    sd = expert.state_dict()
    for k in vision:  # CLS embedding and post-LN too, though Eagle's forward never reads them
        assert torch.equal(sd["vision_tower." + k], native[k]), k

    # the reference: HF CLIPVisionModel from the CLIPModel repo (as Eagle loads it), then embeddings ->
    # CLS dropped -> pre_layrnorm -> every encoder layer
    ref = CLIPVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = _canvas(56)
    with torch.no_grad():
        want = ref.encoder(inputs_embeds=ref.pre_layrnorm(ref.embeddings(x)[:, 1:])).last_hidden_state
        got = expert(x).flatten(2).transpose(1, 2)
    _assert_close(got, want)


def test_clip_vision_model_checkpoints_both_layouts(tmp_path):
    """A CLIPVisionModel checkpoint: transformers 4 saved `vision_model.*` (+ position_ids buffers),
    transformers 5 saves the flat module keys; both fill the expert identically."""
    from transformers import CLIPVisionModel

    full = clip_model()
    vision = {k: v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    want = {"vision_tower." + k: v for k, v in vision.items()}

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({**vision, "vision_model.embeddings.position_ids": torch.arange(17)[None]}, legacy / "pytorch_model.bin")
    flat = CLIPVisionModel(full.config.vision_config)
    flat.load_state_dict({k[len("vision_model.") :]: v for k, v in vision.items()})
    flat.save_pretrained(tmp_path / "flat")
    assert "embeddings.patch_embedding.weight" in read_native("clip-448", str(tmp_path / "flat"))

    for d, fmt, unused in (
        (legacy, "hf-clip", ["vision_model.embeddings.position_ids"]),
        (tmp_path / "flat", "hf-clip-vision", []),
    ):
        with torch.device("meta"):  # names and shapes only
            expert = build_expert("clip-448", TINY["clip-448"])
        conv = convert("clip-448", read_native("clip-448", str(d)), expert)
        assert conv.format == fmt and conv.unused == unused and conv.new == []
        assert conv.state.keys() == want.keys()
        assert all(torch.equal(conv.state[k], want[k]) for k in want)


def test_clip_checkpoint_that_does_not_fill_the_expert_fails_naming_keys():
    native = dict(clip_model().state_dict())
    del native["vision_model.encoder.layers.1.mlp.fc2.weight"]
    expert = build_expert("clip-448", TINY["clip-448"])
    with pytest.raises(
        ExpertWeightsError,
        match=r"clip-448.*1 expert tensor\(s\) missing.*"
        r"vision_tower\.vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight",
    ):
        convert("clip-448", native, expert)
    wider = dict(clip_model(intermediate_size=48).state_dict())  # fc1 weight+bias, fc2 weight: 3 per layer
    with pytest.raises(
        ExpertWeightsError,
        match=r"clip-448.*6 tensor\(s\) of another shape: "
        r"vision_tower\.vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight "
        r"\(checkpoint \[48, 32\], expert \[64, 32\]\)",
    ):
        convert("clip-448", wider, expert)
    deeper = dict(clip_model(num_hidden_layers=3).state_dict())  # a layer the expert lacks
    with pytest.raises(ExpertWeightsError, match=r"no place in the expert.*vision_model\.encoder\.layers\.2\."):
        convert("clip-448", deeper, expert)
    with pytest.raises(ExpertWeightsError, match=r"clip-448: checkpoint layout not recognised.*hf-clip"):
        convert("clip-448", dict(sam_model().state_dict()), expert)


# ----------------------------------------------------------------------------- convnext-1024


def test_convnext_from_timm_and_open_clip_match_timm_stage4_map(tmp_path):
    from safetensors.torch import save_file

    timm = timm_convnext()
    sd = timm.state_dict()
    (tmp_path / "timm").mkdir()
    save_file(sd, tmp_path / "timm" / "model.safetensors")  # timm's hub layout
    # open_clip's image tower: the timm trunk (classifier reset: head.norm kept, no head.fc) under
    # `visual.trunk.`, its projection `visual.head.proj`, and the text tower at the top level
    open_clip = {"visual.trunk." + k: v for k, v in sd.items() if not k.startswith("head.fc.")}
    text = {
        "visual.head.proj.weight": torch.randn(16, 32),
        "text_projection": torch.randn(16, 16),
        "logit_scale": torch.tensor(4.6),
        "token_embedding.weight": torch.randn(64, 16),
        "positional_embedding": torch.randn(8, 16),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16),
    }
    (tmp_path / "open_clip").mkdir()
    torch.save({**open_clip, **text}, tmp_path / "open_clip" / "open_clip_pytorch_model.bin")

    x = _canvas(64)
    with torch.no_grad():
        want = timm.stages(timm.stem(x))  # Eagle: stem and stages, the raw stage-4 map, no final norm
    _assert_close(want, timm.forward_features(x))  # norm_pre is the identity for this ConvNeXt

    expert, conv = _load("convnext-1024", read_native("convnext-1024", str(tmp_path / "timm")))
    # Eagle's filter: every key kept under its name, block layer scales `gamma` -> `weight`
    assert sorted(conv.loaded) == sorted("vision_tower." + k.replace(".gamma", ".weight") for k in sd)
    assert "stages.2.blocks.1.gamma" in sd and "vision_tower.stages.2.blocks.1.weight" in conv.loaded
    assert conv.new == conv.mismatched == conv.unused == [] and conv.format == "timm-convnext"
    with torch.no_grad():
        _assert_close(expert(x), want)

    expert, conv = _load("convnext-1024", read_native("convnext-1024", str(tmp_path / "open_clip")))
    assert conv.format == "open-clip-convnext"
    assert sorted(conv.new) == ["vision_tower.head.fc.bias", "vision_tower.head.fc.weight"]  # never run
    assert sorted(conv.unused) == sorted(text)
    assert len(conv.loaded) == len(open_clip) and "vision_tower.head.norm.weight" in conv.loaded
    with torch.no_grad():
        _assert_close(expert(x), want)


def test_convnext_head_with_other_class_count_is_reported_mismatched():
    native = timm_convnext(num_classes=7).state_dict()
    expert, conv = _load("convnext-1024", native)  # the expert's head has 10 classes: no error
    assert conv.mismatched == ["vision_tower.head.fc.weight", "vision_tower.head.fc.bias"]
    assert conv.shapes["vision_tower.head.fc.weight"] == ((7, 32), (10, 32))
    assert conv.new == [] and "vision_tower.head.fc.weight" not in conv.state
    assert conv.summary() == f"convnext-1024: {len(native) - 2} loaded, 0 new, 2 mismatched, 0 unused"


# ----------------------------------------------------------------------------- sam-1024


def test_sam_trunk_loaded_and_pretrained_neck_never_loaded(tmp_path):
    import torch.nn.functional as F

    sam = sam_model()
    neck = sam.vision_encoder.neck
    with torch.no_grad():  # a recognisable pretrained neck
        neck.conv1.weight.fill_(0.5)
        neck.layer_norm1.weight.fill_(0.25)
        neck.layer_norm1.bias.fill_(-0.75)
    sam.save_pretrained(tmp_path)
    native = read_native("sam-1024", str(tmp_path))
    expert = build_expert("sam-1024", TINY["sam-1024"]).eval()
    ours = [
        "vision_tower.neck.conv1.weight",
        "vision_tower.neck.layer_norm1.weight",
        "vision_tower.neck.layer_norm1.bias",
    ]
    for k in ours:  # same names and shapes as the pretrained neck's first half
        assert native[k.replace("vision_tower.", "vision_encoder.")].shape == expert.state_dict()[k].shape
    before = {k: expert.state_dict()[k].clone() for k in ours}

    conv = convert("sam-1024", native, expert)
    # Eagle: SamModel.vision_encoder with its neck replaced by a new one
    trunk = [k for k in native if k.startswith("vision_encoder.") and not k.startswith("vision_encoder.neck.")]
    assert sorted(conv.loaded) == sorted("vision_tower." + k[len("vision_encoder.") :] for k in trunk)
    assert sorted(conv.new) == sorted(ours) and conv.mismatched == []
    assert {
        "vision_encoder.neck.conv1.weight",
        "vision_encoder.neck.layer_norm1.weight",
        "vision_encoder.neck.conv2.weight",
        "vision_encoder.neck.layer_norm2.bias",
        "shared_image_embedding.positional_embedding",
    } <= set(conv.unused)
    assert any(k.startswith("mask_decoder.") for k in conv.unused)
    assert any(k.startswith("prompt_encoder.") for k in conv.unused)
    assert conv.summary() == f"sam-1024: {len(trunk)} loaded, 3 new, 0 mismatched, {len(native) - len(trunk)} unused"
    expert.load_state_dict(conv.state, strict=False)
    after = expert.state_dict()
    for k in ours:
        assert torch.equal(after[k], before[k]), k
    assert not torch.all(after["vision_tower.neck.conv1.weight"] == 0.5)
    assert not torch.all(after["vision_tower.neck.layer_norm1.bias"] == -0.75)

    # the native encoder's trunk, then the expert's own (new) neck: 1x1 conv, channel LayerNorm eps 1e-6
    enc = sam.vision_encoder
    x = _canvas(64)
    with torch.no_grad():
        h = enc.patch_embed(x) + enc.pos_embed
        for layer in enc.layers:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        y = F.conv2d(h.permute(0, 3, 1, 2), after["vision_tower.neck.conv1.weight"]).permute(0, 2, 3, 1)
        want = F.layer_norm(
            y, (8,), after["vision_tower.neck.layer_norm1.weight"], after["vision_tower.neck.layer_norm1.bias"], 1e-6
        ).permute(0, 3, 1, 2)
        _assert_close(expert(x), want)


# ----------------------------------------------------------------------------- pix2struct-1024


def test_pix2struct_encoder_from_conditional_generation_repo(tmp_path):
    p2s = pix2struct_model()
    p2s.save_pretrained(tmp_path)
    native = read_native("pix2struct-1024", str(tmp_path))
    expert, conv = _load("pix2struct-1024", native)
    # Eagle keeps `.encoder` of Pix2StructForConditionalGeneration: `encoder.X` is `vision_tower.X`
    encoder = [k for k in native if k.startswith("encoder.")]
    assert sorted(conv.loaded) == sorted("vision_tower." + k[len("encoder.") :] for k in encoder)
    assert sorted(conv.unused) == sorted(k for k in native if k.startswith("decoder."))
    assert conv.new == [] and "decoder.lm_head.weight" in conv.unused

    rows, cols = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")  # 1-based patch ids
    ids = torch.stack([rows.flatten(), cols.flatten()], -1).float().expand(2, 16, 2)
    patches = torch.cat([ids, torch.randn(2, 16, 768, generator=torch.Generator().manual_seed(0))], -1)
    mask = torch.ones(2, 16)
    with torch.no_grad():
        out = p2s.encoder(flattened_patches=patches, attention_mask=mask).last_hidden_state
        want = out[:, :16].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)  # the first grid^2 tokens as a map
        _assert_close(expert(patches, mask), want)


# ----------------------------------------------------------------------------- det-1024


def test_eva_detectron2_checkpoint_takes_ema_backbone_net_without_rope(tmp_path):
    ema = eva_vitdet_state(seed=1)
    live = eva_vitdet_state(seed=2, with_block_rope=True)  # detectron2's `model`: not what Eagle loads
    path = tmp_path / "eva02_L_coco_det_sys_o365.pth"
    torch.save({"model": live, "ema_state": ema, "iteration": 90000}, path)
    native = read_native("det-1024", str(path))
    assert native.keys() == ema.keys() and all(torch.equal(native[k], ema[k]) for k in ema)

    expert, conv = _load("det-1024", native)
    # Eagle: keys containing `backbone.net.` with that prefix stripped, minus every key containing `rope`
    vit = [k for k in ema if k.startswith("backbone.net.") and "rope" not in k]
    assert sorted(conv.loaded) == sorted("vision_tower." + k[len("backbone.net.") :] for k in vit)
    assert sorted(conv.unused) == sorted(set(ema) - set(vit))
    assert {
        "backbone.net.rope_win.freqs_cos",
        "backbone.net.rope_glb.freqs_sin",
        "backbone.simfp_2.0.weight",
        "roi_heads.box_predictor.0.cls_score.weight",
        "pixel_mean",
    } <= set(conv.unused)
    assert conv.new == [] and conv.mismatched == [] and conv.format == "detectron2-vitdet"
    vt = expert.vision_tower
    assert torch.equal(vt.blocks[1].attn.q_bias, ema["backbone.net.blocks.1.attn.q_bias"])
    assert torch.equal(vt.blocks[2].mlp.ffn_ln.weight, ema["backbone.net.blocks.2.mlp.ffn_ln.weight"])
    assert torch.equal(vt.pos_embed, ema["backbone.net.pos_embed"])

    # oracle: the same module filled by attribute from the EVA names
    oracle = build_expert("det-1024", TINY["det-1024"]).eval()
    with torch.no_grad():
        for k in vit:
            oracle.vision_tower.get_parameter(k[len("backbone.net.") :]).copy_(ema[k])
        _assert_close(expert(_canvas(64)), oracle(_canvas(64)))

    # a model state dict also stores the shared RoPE modules under every block: unused as well
    conv = convert("det-1024", live, expert)
    assert "backbone.net.blocks.1.attn.rope.freqs_cos" in conv.unused and conv.new == []


@pytest.mark.parametrize("wrap", ["ema_state", "module", "model", None])
def test_pickled_training_checkpoints_are_unwrapped(tmp_path, wrap):
    state = eva_vitdet_state()
    obj = {wrap: state, "iteration": 7} if wrap else state
    torch.save(obj, tmp_path / "det.pth")
    assert read_native("det-1024", str(tmp_path / "det.pth")).keys() == state.keys()


# ----------------------------------------------------------------------------- reading


def test_sharded_repo_reads_like_a_single_file(tmp_path):
    model = clip_model()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one = read_native("clip-448", str(tmp_path / "one"))
    sharded = read_native("clip-448", str(tmp_path / "sharded"))
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)


def test_unreadable_weights_name_expert_and_path(tmp_path):
    gone = tmp_path / "eva02_L_coco_det_sys_o365.pth"
    with pytest.raises(ExpertWeightsError, match=f"det-1024: no weights at {gone}"):
        read_native("det-1024", str(gone))
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    with pytest.raises(ExpertWeightsError, match=r"sam-1024: no weights file in directory .*repo.*config\.json"):
        read_native("sam-1024", str(tmp_path / "repo"))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ExpertWeightsError, match=f"clip-448: cannot read weights from {bad}"):
        read_native("clip-448", str(bad))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ExpertWeightsError, match=r"pix2struct-1024: .*list\.pt: holds a list"):
        read_native("pix2struct-1024", str(tmp_path / "list.pt"))
    with pytest.raises(ExpertWeightsError, match="siglip"):
        read_native("siglip-384", str(bad))


def test_conversion_summary_format():
    conv = Conversion(state={}, loaded=["a"] * 392, new=[], mismatched=[], unused=["b"] * 197, name="clip-448")
    assert conv.summary() == "clip-448: 392 loaded, 0 new, 0 mismatched, 197 unused"


def test_official_sizes_fill_the_full_experts_on_meta_device():
    """The release layouts at their real sizes (built by the native libraries on the meta device:
    no memory, no download) fill the official-size experts; loaded counts derived by hand."""
    import timm
    import transformers as T

    with torch.device("meta"):
        clip = T.CLIPModel(
            T.CLIPConfig(  # openai/clip-vit-large-patch14-336
                vision_config=dict(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    patch_size=14,
                    image_size=336,
                    hidden_act="quick_gelu",
                ),
                text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                projection_dim=768,
            )
        )
        sam = T.SamModel(
            T.SamConfig(
                vision_config=dict(  # facebook/sam-vit-large
                    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]
                )
            )
        )
        p2s = T.Pix2StructForConditionalGeneration(
            T.Pix2StructConfig(  # google/pix2struct-large
                vision_config=dict(
                    hidden_size=1536, d_ff=3968, num_attention_heads=24, num_hidden_layers=18, d_kv=64, seq_len=4096
                ),
                text_config=dict(vocab_size=50244, hidden_size=1536, d_ff=3968, num_layers=18, num_heads=24, d_kv=64),
            )
        )
        convnext = timm.create_model("convnext_xxlarge", pretrained=False)
        want = {
            # embeddings 3 + pre-LN 2 + 24 layers x (q, k, v, out, fc1, fc2, 2 LNs: 16 tensors) + post-LN 2
            "clip-448": (clip, 3 + 2 + 24 * 16 + 2, 0),
            # pos_embed 1 + patch_embed 2 + 24 layers x (2 LNs, rel_pos_h/w, qkv, proj, lin1, lin2: 14); new neck 3
            "sam-1024": (sam, 1 + 2 + 24 * 14, 3),
            # embeddings 4 + 18 layers x (query, key, value, output, wi_0, wi_1, wo, 2 LNs: 9) + final LN 1
            "pix2struct-1024": (p2s, 4 + 18 * 9 + 1, 0),
            # stem 4 + 3 downsamples x 4 + 40 blocks x (conv_dw 2, norm 2, fc1 2, fc2 2, gamma 1) + head 4
            "convnext-1024": (convnext, 4 + 3 * 4 + 40 * 9 + 4, 0),
        }
        for name, (model, loaded, new) in want.items():
            conv = convert(name, model.state_dict(), build_expert(name))
            assert (len(conv.loaded), len(conv.new), conv.mismatched) == (loaded, new, []), name
