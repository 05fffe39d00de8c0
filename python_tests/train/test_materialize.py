"""Building the model once per job: which ranks build on the meta device, and that a meta-built
model given rank 0's tensors is the same model (no tensor kept outside parameters and buffers,
tied weights tied again)."""

import json

import pytest
import torch

from eagle_fast.train import materialize
from eagle_fast.train.config import TrainConfig


def _cfg(tmp_path, **kw):
    return TrainConfig(recipe="tiny-x5", output_dir=str(tmp_path), **kw)


@pytest.mark.parametrize(
    "kw, rank, world, want",
    [
        ({}, 0, 1, "real"),
        ({}, 0, 2, "real"),
        ({}, 1, 2, "meta"),
        ({"fsdp": True}, 3, 8, "meta"),
        ({"deepspeed": "zero2"}, 1, 2, "meta"),
        ({"deepspeed": "zero3"}, 0, 2, "zero3"),
        ({"deepspeed": "zero3"}, 1, 2, "zero3"),
        ({"deepspeed": "zero3"}, 0, 1, "real"),  # one process: nothing to partition across
        ({"lora_enable": True, "bits": 4}, 1, 2, "real"),  # quantization needs the weights on every rank
    ],
)
def test_which_ranks_build_on_the_meta_device(tmp_path, kw, rank, world, want):
    cfg = _cfg(tmp_path, **kw)
    assert materialize.construction(cfg, rank, world) == want
    assert materialize.shared_from_rank0(cfg, world) == (
        want == "meta" or (world > 1 and want == "real" and cfg.bits == 16 and not kw.get("deepspeed") == "zero3")
    )


def test_a_user_deepspeed_file_is_read_for_its_stage(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert materialize.construction(_cfg(tmp_path, deepspeed=str(path)), 1, 4) == "zero3"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert materialize.construction(_cfg(tmp_path, deepspeed=str(path)), 1, 4) == "meta"


@pytest.mark.parametrize("tie", [False, True])
def test_a_meta_built_model_with_rank0_tensors_is_the_same_model(tmp_path, tie):
    """What a rank > 0 does: build on meta (no memory: every tensor on the meta device), allocate,
    receive every parameter and buffer (here copied, as the broadcast does), then compute exactly
    what rank 0's model computes."""
    from eagle_fast.model import EagleLlamaConfig, EagleLlamaForCausalLM, presets

    config = EagleLlamaConfig(**{**presets.PRESETS["eagle-tiny-x5"], "tie_word_embeddings": tie})
    torch.manual_seed(0)
    real = EagleLlamaForCausalLM(config).eval()
    with torch.device("meta"):
        meta = EagleLlamaForCausalLM(config).eval()
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    materialize.allocate(meta, torch.device("cpu"))
    assert (meta.lm_head.weight is meta.model.embed_tokens.weight) == tie
    for src, dst in zip([*real.parameters(), *real.buffers()], [*meta.parameters(), *meta.buffers()], strict=True):
        dst.data.copy_(src.data)
    from eagle_fast.vision.processor import EagleImageProcessor

    images = EagleImageProcessor.from_model_config(config)([torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8)])
    ids = torch.tensor([[1, 5, -200, 7, 9]])  # -200: the image placeholder
    with torch.no_grad():
        a = real(input_ids=ids, images=images).logits
        b = meta(input_ids=ids, images=images).logits
    assert a.shape[1] == 4 + config.mm_grid**2 and torch.equal(a, b)
