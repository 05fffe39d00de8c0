"""--packing: each micro-batch's records in one row (varlen attention per record). The same records
per step as padded batches, and the same per-step loss (a per-token mean over the step's learned
tokens), with gradient accumulation and over 2 DDP ranks."""

import json
import os
import subprocess
import sys

from eagle_fast.train.__main__ import parse
from eagle_fast.train.config import recipe
from eagle_fast.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# fp32 tolerances of the per-step losses, relative. In one process both layouts run the LLM's
# attention per record on the same varlen kernel (a padded batch is unpadded first), so the step
# losses differ only by summation order in the loss head and the splice: measured 0 to 5e-8 over
# 6 steps; RTOL = 1e-6 is ~10 fp32 ulps. Over 2 DDP ranks the gradients are also summed in another
# order (equal losses were measured over the 2 steps here, but not guaranteed), and AdamW, dividing
# each gradient by its running magnitude, turns such rounding in near-zero elements into steps of up
# to the learning rate: RTOL_DDP = 1e-5, as for the DDP / one-process comparison in test_trainer.py.
# Both are below a real difference: letting a packed record attend to the one before it moves
# step 1's loss by ~9e-5 on this model.
RTOL, RTOL_DDP = 1e-6, 1e-5


def _cfg(tmp_path, small_data, name, **kw):
    data, images, _ = small_data
    base = dict(
        output_dir=str(tmp_path / name),
        data_path=data,
        image_folder=images,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        save_steps=0,
        model_max_length=96,
    )
    base.update(kw)
    return recipe("tiny-x5", "sft", **base)


def _close(a, b, rtol=RTOL):
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(x) for x, y in zip(a, b))


def test_default_rule():
    assert recipe("tiny-x5", "sft").packs() and recipe("eagle-x5-7b", "pretrain").packs()
    assert not recipe("tiny-x5", "prealign", vision_tower="convnext-1024").packs()
    assert not recipe("tiny-x5", "sft", packing=False).packs()
    assert recipe("tiny-x5", "sft").replace(stage="prealign").packs() is False  # resolved per stage
    assert parse(["--packing", "false"]).packing is False and parse(["--no_packing"]).packing is False
    assert parse([]).packing is None and parse(["--packing"]).packing is True


def test_packed_and_padded_runs_give_the_same_losses_with_accumulation(tmp_path, small_data):
    """2 micro-batches of 2 records per step, 3 steps: packed rows (the model gets packed_seq_lens)
    and padded rows give the same per-step losses, step 1 included."""
    packed = Trainer(_cfg(tmp_path, small_data, "packed", packing=True))
    padded = Trainer(_cfg(tmp_path, small_data, "padded", packing=False))
    seen = []
    forward = packed.model.forward
    packed.model.forward = lambda *a, **kw: (seen.append(kw.get("packed_seq_lens")), forward(*a, **kw))[1]
    lp, lq = packed.train()["losses"], padded.train()["losses"]
    assert len(seen) == 6 and all(s is not None and len(s) == 2 for s in seen)  # 3 steps x 2 micro-batches of 2
    assert _close(lq, lp), (lq, lp)
    rows = {n: [json.loads(x) for x in open(tmp_path / n / "metrics.jsonl")] for n in ("packed", "padded")}
    for key in ("samples", "tokens"):  # the logged throughput counts records and real tokens, not rows
        assert [r[key] for r in rows["packed"]] == [r[key] for r in rows["padded"]], key


def test_two_ddp_ranks_packed_match_one_process_padded(tmp_path, small_data):
    """torchrun, 2 CPU ranks (gloo), each packing its 2 records per step into one row == one process
    padding 4 records per step: the per-token loss is the mean over every rank's learned tokens."""
    data, images, _ = small_data
    common = [
        "--recipe",
        "tiny-x5",
        "--data_path",
        data,
        "--image_folder",
        images,
        "--max_steps",
        "2",
        "--model_max_length",
        "96",
        "--save_steps",
        "0",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "two": [
            *torchrun,
            "-m",
            "eagle_fast.train",
            *common,
            "--per_device_train_batch_size",
            "2",
            "--packing",
            "true",
        ],
        "one": [
            sys.executable,
            "-m",
            "eagle_fast.train",
            *common,
            "--per_device_train_batch_size",
            "4",
            "--packing",
            "false",
        ],
    }
    for name, cmd in runs.items():
        r = subprocess.run(
            [*cmd, "--output_dir", str(tmp_path / name)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
    la, lb = ([json.loads(x)["loss"] for x in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two"))
    assert len(la) == 2 and _close(la, lb, RTOL_DDP), (la, lb)
