"""attn_implementation="eagle_attention": tiny random transformers models give the logits and
gradients they give on "sdpa", on the CPU flash kernel and on the Triton kernels."""

import copy

import pytest
import torch

from eagle_fast.ops import attention_backend
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

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_lm_logits_and_gradients(kind, backend, padded):
    ref, ours = _pair(_llama(kind))
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :6] = 0  # left padding: that call carries a mask and runs on sdpa
    out_ref = ref(ids, attention_mask=mask, labels=ids)
    out_ref.loss.backward()
    with attention_backend(backend):
        out = ours(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    keep = mask.bool()
    assert (out.logits[keep] - out_ref.logits[keep]).abs().max() < 1e-5
    assert (_grads(ours) - _grads(ref)).abs().max() < 1e-5


def test_generate_with_kv_cache_matches_sdpa():
    ref, ours = _pair(_llama("llama"))
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(2))
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    got = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_clip_vision_encoder_non_causal():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14)
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
    q, k, v = torch.randn(1, 4, 18, 32, generator=g), torch.randn(1, 2, 18, 32, generator=g), torch.randn(
        1, 2, 18, 32, generator=g)
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
