"""Which device a training rank owns, from --device and LOCAL_RANK (the rules DDP, FSDP2 and NCCL
need: one device per process), and that a run on an explicit device trains there."""

import pytest
import torch

from eagle_fast.train.device import backend_for, resolve_device


@pytest.mark.parametrize(
    "requested, env, cuda, want",
    [
        (None, {}, False, "cpu"),
        (None, {"LOCAL_RANK": "3"}, False, "cpu"),
        (None, {}, True, "cuda:0"),
        (None, {"LOCAL_RANK": "3"}, True, "cuda:3"),
        ("cuda", {"LOCAL_RANK": "2"}, True, "cuda:2"),
        ("cuda:5", {"LOCAL_RANK": "2"}, True, "cuda:5"),
        ("cpu", {"LOCAL_RANK": "2"}, True, "cpu"),
    ],
)
def test_each_rank_owns_its_local_device(requested, env, cuda, want):
    assert resolve_device(requested, env, cuda_available=cuda) == torch.device(want)


def test_cuda_without_cuda_is_a_clear_error_and_backends_follow_the_device():
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1", {}, cuda_available=False)
    assert backend_for(torch.device("cuda", 1)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


def test_a_run_on_an_explicit_device_keeps_model_and_batches_there(tmp_path, small_data):
    from eagle_fast.train.config import recipe
    from eagle_fast.train.loop import Trainer

    data, images, _ = small_data
    cfg = recipe(
        "tiny-x5",
        "sft",
        output_dir=str(tmp_path / "run"),
        data_path=data,
        image_folder=images,
        per_device_train_batch_size=2,
        max_steps=2,
        save_steps=0,
        model_max_length=96,
        device="cpu",
    )
    trainer = Trainer(cfg)
    assert trainer.device == torch.device("cpu")
    assert all(p.device == trainer.device for p in trainer.model.parameters())
    assert not trainer.optimizer.defaults.get("fused")  # fused AdamW is CUDA's
    out = trainer.train()
    assert out["steps"] == 2 and all(loss == loss for loss in out["losses"])


def test_bf16_autocast_steps_run_packed_and_padded(tmp_path, small_data):
    """--bf16 (autocast) through the LLM's attention on our kernels, packed and padded: the loss
    stays finite and both layouts agree to bf16 rounding (eps 2^-7: rtol 2e-2, under 3 eps)."""
    from eagle_fast.train.config import recipe
    from eagle_fast.train.loop import Trainer

    data, images, _ = small_data
    losses = {}
    for packing in (True, False):
        cfg = recipe(
            "tiny-x5",
            "sft",
            output_dir=str(tmp_path / f"p{packing}"),
            data_path=data,
            image_folder=images,
            per_device_train_batch_size=2,
            max_steps=2,
            save_steps=0,
            model_max_length=96,
            bf16=True,
            packing=packing,
        )
        losses[packing] = Trainer(cfg).train()["losses"]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2), losses


def test_fsdp2_bf16_policy_trains_like_autocast(tmp_path, small_data):
    """FSDP2 with --bf16 computes in bf16 through its MixedPrecisionPolicy (no autocast): 2 ranks
    train, and the first step's loss matches one process under bf16 autocast to bf16 rounding."""
    import json
    import os
    import subprocess
    import sys

    from eagle_fast.train.config import recipe
    from eagle_fast.train.loop import Trainer

    data, images, _ = small_data
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    common = dict(data_path=data, image_folder=images, max_steps=2, save_steps=0, model_max_length=96, bf16=True)
    one = Trainer(
        recipe("tiny-x5", "sft", output_dir=str(tmp_path / "one"), per_device_train_batch_size=4, **common)
    ).train()["losses"]
    args = [f"--{k}={v}" for k, v in common.items()] + [
        "--per_device_train_batch_size=2",
        "--fsdp=true",
        f"--output_dir={tmp_path / 'two'}",
    ]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "eagle_fast.train",
            "--recipe",
            "tiny-x5",
            *args,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert abs(rows[0]["loss"] - one[0]) <= 2e-2 * abs(one[0]), (rows[0]["loss"], one[0])
