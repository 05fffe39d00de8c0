"""attn_implementation="eagle_attention": tiny random transformers models give the logits and
gradients they give on "sdpa", on the CPU flash kernel and on the Triton kernels; padded calls
without a cache run unpadded on the varlen kernel (never on scaled_dot_product_attention)."""

import copy

import pytest
import torch

from eagle_fast.ops import attention_backend, attention_hf
from eagle_fast.ops.attention import _attention_reference
from eagle_fast.ops.attention_hf import eagle_attention_forward, register_transformers_attention


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert register_transformers_attention() == "eagle_attention"


def _pair(model):
    """(model on sdpa, deep copy on eagle_attention), both in eval mode (no dropout)."""
    model.eval().set_attn_implementation("sdpa")
    ours = copy.deepcopy(model)
    ours.set_attn_implementation("eagle_attention")
    return model, ours


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _llama(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


def _no_sdpa(monkeypatch):
    """Makes any call of scaled_dot_product_attention (ours or transformers') fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention was called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)


def _padding(b, s, side, gen):
    """(B, S) long mask: row 0 full, the others padded on `side` by 1..S-2 tokens."""
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(1, b):
        n = int(torch.randint(1, s - 1, (1,), generator=gen))
        mask[i, :n] = 0 if side == "left" else 1
        if side == "right":
            mask[i, s - n :] = 0
    return mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_padded_call_runs_varlen_and_matches_sdpa(monkeypatch, side, causal, backend):
    """A 2-D padding mask (what eagle_attention_mask hands a call with Sq == Sk and no cache), GQA
    4 query heads on 2 kv heads: the real rows and the q/k/v gradients equal sdpa's under the
    equivalent 4-D mask, and scaled_dot_product_attention is never called."""
    gen = torch.Generator().manual_seed(7)
    b, s, d = 3, 19, 32
    q = torch.randn(b, 4, s, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(b, 2, s, d, generator=gen, requires_grad=True) for _ in range(2))
    w = torch.randn(b, s, 4, d, generator=gen)
    mask = _padding(b, s, side, gen)
    keep = mask.bool()
    # reference: padding & causal; padded query rows also see themselves so that no row is empty
    # (their outputs are not compared and get no gradient, so this changes nothing else)
    allowed = keep[:, None, None, :].expand(b, 1, s, s)
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(s, dtype=torch.bool)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=0.2, enable_gqa=True
    ).transpose(1, 2)
    want_grads = torch.autograd.grad((want * w)[keep].sum(), (q, k, v))
    module = torch.nn.Module()
    module.is_causal = causal
    with monkeypatch.context() as m, attention_backend(backend):
        _no_sdpa(m)
        got, _ = eagle_attention_forward(module, q, k, v, mask, scaling=0.2)
        grads = torch.autograd.grad((got * w)[keep].sum(), (q, k, v))
    assert got.shape == (b, s, 4, d)
    assert (got[keep] - want[keep]).abs().max() < 1e-5
    assert got[~keep].abs().max() == 0  # padded rows: zeros, like the flash kernels' empty rows
    for g, r in zip(grads, want_grads):
        assert (g - r).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("padded", ["none", "left", "right"])
def test_causal_lm_logits_and_gradients(monkeypatch, kind, backend, padded):
    ref, ours = _pair(_llama(kind))
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded == "left":
        mask[1, :6] = 0  # batch generation's layout
    elif padded == "right":
        mask[1, 29:] = 0  # training's layout
    labels = ids.masked_fill(mask == 0, -100)  # padded rows differ (zeros here) and are never learned
    out_ref = ref(ids, attention_mask=mask, labels=labels)
    out_ref.loss.backward()
    with monkeypatch.context() as m, attention_backend(backend):
        _no_sdpa(m)  # padded or not, no call falls back to sdpa
        out = ours(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    keep = mask.bool()
    assert (out.logits[keep] - out_ref.logits[keep]).abs().max() < 1e-5
    assert (_grads(ours) - _grads(ref)).abs().max() < 1e-5


@pytest.mark.parametrize("padded", ["none", "right"])
def test_bf16_autocast_training_step(monkeypatch, padded):
    """Under bf16 autocast (the trainer's --bf16) Llama's rotary step hands q and k back in fp32
    and v in bf16: the call runs in bf16 as sdpa's would, and the logits' error against fp32 is
    at most 2x sdpa's own under the same autocast."""
    ref, ours = _pair(_llama("llama"))
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded == "right":
        mask[1, 29:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    keep = mask.bool()
    with torch.no_grad():
        exact = ref(ids, attention_mask=mask).logits[keep]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = ref(ids, attention_mask=mask, labels=labels).logits[keep].float()
        with monkeypatch.context() as m:
            _no_sdpa(m)
            out = ours(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    err, ref_err = (out.logits[keep].float() - exact).abs().max(), (sdpa - exact).abs().max()
    assert ref_err > 0 and err <= 2 * ref_err, (err, ref_err)


def test_generate_with_kv_cache_matches_sdpa():
    ref, ours = _pair(_llama("llama"))
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(2))
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    got = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_left_padded_batch_generation_with_kv_cache_matches_sdpa(monkeypatch):
    """Prefill of the left-padded batch runs varlen (once per layer); the decode steps against the
    cache take transformers' sdpa mask; the greedy tokens equal the sdpa model's."""
    ref, ours = _pair(_llama("llama"))
    ids = torch.randint(1, 96, (3, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :9] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    calls = []
    unpadded = attention_hf._unpadded

    def spy(q, *args):
        calls.append(q.shape[1])
        return unpadded(q, *args)

    monkeypatch.setattr(attention_hf, "_unpadded", spy)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert calls == [13] * ours.config.num_hidden_layers  # the prefill only


def test_static_cache_prefill_keeps_top_left_causality():
    """A static cache's prefill has Sk = the cache size > Sq with nothing cached: sdpa may drop that
    mask (top-left is_causal), our kernels align bottom-right, so the mask must be kept there."""
    ref, ours = _pair(_llama("llama"))
    ids = torch.randint(1, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_pix2struct_padded_patches_run_varlen(monkeypatch):
    """Pix2Struct passes a (B, P) patch mask: the encoder runs it unpadded (no sdpa call) and its
    real tokens equal the sdpa encoder's."""
    from transformers import Pix2StructVisionConfig, Pix2StructVisionModel

    torch.manual_seed(0)
    cfg = Pix2StructVisionConfig(
        hidden_size=64,
        patch_embed_hidden_size=12,
        d_ff=96,
        d_kv=16,
        num_attention_heads=4,
        num_hidden_layers=2,
        seq_len=64,
    )
    ref, ours = _pair(Pix2StructVisionModel(cfg))
    patches = torch.randn(2, 40, 2 + 12)
    patches[:, :, :2] = torch.arange(1, 41).float()[:, None]  # row / col ids
    mask = torch.ones(2, 40)
    mask[0, 30:], mask[1, 36:] = 0, 0
    patches = patches * mask[..., None]  # padded patches are zeros, as the processor writes them
    want = ref(flattened_patches=patches, attention_mask=mask).last_hidden_state
    with monkeypatch.context() as m:
        _no_sdpa(m)
        got = ours(flattened_patches=patches, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max() < 1e-5


def test_clip_vision_encoder_non_causal():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
    )
    ref, ours = _pair(CLIPVisionModel(cfg))
    pixels = torch.randn(2, 3, 56, 56)
    want = ref(pixels).last_hidden_state
    for backend in ("auto", "triton"):
        with attention_backend(backend):
            got = ours(pixels).last_hidden_state
        assert (got - want).abs().max() < 1e-5, backend


def test_packed_sequences_via_flash_kwargs():
    """cu_seq_lens_q / max_length_q kwargs (batch of one, no mask) run as varlen."""
    g = torch.Generator().manual_seed(4)
    lengths = [5, 12, 1]
    cu = torch.tensor([0, 5, 17, 18], dtype=torch.int32)
    q, k, v = (
        torch.randn(1, 4, 18, 32, generator=g),
        torch.randn(1, 2, 18, 32, generator=g),
        torch.randn(1, 2, 18, 32, generator=g),
    )
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = eagle_attention_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, max_length_q=max(lengths))
    want = _attention_reference(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), True, 0.25, cu)
    assert out.shape == (1, 18, 4, 32)
    assert (out[0] - want).abs().max() < 1e-5


def test_unsupported_features_are_refused():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 32)
    with pytest.raises(ValueError, match="softcapping"):
        eagle_attention_forward(module, q, q, q, None, softcap=30.0)
    module.train()
    with pytest.raises(ValueError, match="dropout"):
        eagle_attention_forward(module, q, q, q, None, dropout=0.1)
