"""Activation checkpointing (--gradient_checkpointing): every LLM layer and every expert's blocks are
recomputed in the backward pass, and the gradients equal those of the plain model."""

import numpy as np
import torch

from eagle_fast.train.builders import build_model, build_tokenizer
from eagle_fast.train.config import recipe


def _model(tmp_path, on: bool):
    cfg = recipe("tiny-x5", "sft", output_dir=str(tmp_path), gradient_checkpointing=on)
    tok = build_tokenizer(cfg)
    torch.manual_seed(0)
    model, proc = build_model(cfg, tok)
    return model.train(), proc


def _layers(model):
    """One representative block per part: name -> module."""
    towers = {e.spec.name: e.vision_tower for e in model.model.vision_tower.vision_towers}
    return {
        "llm": model.model.layers[0],
        "clip-448": towers["clip-448"].vision_model.encoder.layers[0],
        "convnext-1024": towers["convnext-1024"].stages[2].blocks[0],
        "sam-1024": towers["sam-1024"].layers[0],
        "det-1024": towers["det-1024"].blocks[0],
        "pix2struct-1024": towers["pix2struct-1024"].encoder.layer[0],
    }


def _grads_and_calls(model, proc):
    calls = {}
    # hooks on a block's first child: recomputation may call the block's forward without its hooks
    hooks = [
        next(m.children()).register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
        for k, m in _layers(model).items()
    ]
    img = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    ids = torch.tensor([[1, -200, 330, 1179, 523, 880]])
    out = model(ids, torch.ones_like(ids), labels=torch.tensor([[-100, -100, 330, 1179, 523, 880]]), images=proc([img]))
    out.loss.backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


def test_checkpointing_recomputes_every_part_with_equal_gradients(tmp_path):
    plain, proc = _model(tmp_path / "a", False)
    ckpt, _ = _model(tmp_path / "b", True)
    g0, calls0 = _grads_and_calls(plain, proc)
    g1, calls1 = _grads_and_calls(ckpt, proc)
    assert calls0 == dict.fromkeys(calls0, 1) and len(calls0) == 6
    assert calls1 == dict.fromkeys(calls0, 2), calls1  # forward + recomputation in backward
    assert g0.keys() == g1.keys()
    worst = max((g0[k] - g1[k]).abs().max().item() for k in g0)
    assert worst < 1e-6, worst
