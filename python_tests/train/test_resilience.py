"""Training that survives its own failures (CPU, tiny recipe): checkpoints verified against their
manifest on resume, with a fallback to the previous one; a save on a full disk leaving `latest`
alone; NaN steps skipped without touching the weights or the optimizer; pickles beyond plain
data refused by name."""

import errno
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from eagle_fast.train import checkpoint, loop, manifest
from eagle_fast.train.checkpoint import CheckpointError, SaveError, find_resume, safe_load, save_checkpoint
from eagle_fast.train.config import TrainConfig, recipe
from eagle_fast.train.loop import Trainer
from eagle_fast.train.nonfinite import NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(out, small_data, **kw):
    data, images, _ = small_data
    base = dict(
        output_dir=str(out),
        data_path=data,
        image_folder=images,
        per_device_train_batch_size=2,
        max_steps=6,
        save_steps=2,
        model_max_length=96,
    )
    base.update(kw)
    return recipe("tiny-x5", "sft", **base)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small_model():
    from eagle_fast.model import EagleLlamaForCausalLM, presets

    torch.manual_seed(0)
    return EagleLlamaForCausalLM(presets.get("eagle-tiny-clip"))


def test_two_checkpoints_kept_by_default():
    # the original keeps 1 (save_total_limit=1): one damaged save would leave nothing to resume from
    assert TrainConfig().save_total_limit == 2 and recipe("eagle-x5-7b", "sft").save_total_limit == 2


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, small_data, capsys):
    full = Trainer(_cfg(tmp_path / "run", small_data)).train()
    assert full["steps"] == 6 and sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint")) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    want = _weights(tmp_path / "run" / "final")
    bad = tmp_path / "run" / "checkpoint-6" / "model.safetensors"
    with open(bad, "r+b") as f:  # a copy or a write cut short
        f.truncate(1000)
    capsys.readouterr()
    again = Trainer(_cfg(tmp_path / "run", small_data, resume="auto")).train()
    err = capsys.readouterr().err
    assert f"skipping checkpoint {tmp_path / 'run' / 'checkpoint-6'}: {bad}: 1000 bytes" in err, err
    assert f"resuming from {tmp_path / 'run' / 'checkpoint-4'}" in err
    assert len(again["losses"]) == 2  # steps 5 and 6 again, from checkpoint-4
    assert _equal(_weights(tmp_path / "run" / "final"), want)
    assert manifest.verify(str(tmp_path / "run" / "checkpoint-6")) == []  # rewritten whole


def _flip_bit(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_bit_flip_is_caught_and_nothing_to_fall_back_to_names_every_bad_file(tmp_path, small_model):
    out = str(tmp_path)
    for step in (1, 2):
        save_checkpoint(out, step, small_model, {"step": step}, keep=2)
    flipped = os.path.join(out, "checkpoint-2", "model.safetensors")
    _flip_bit(flipped, os.path.getsize(flipped) // 2)  # same size: only the hash can tell
    logged = []
    assert find_resume(out, "auto", log=logged.append) == os.path.join(out, "checkpoint-1")
    assert (
        logged[0] == f"skipping checkpoint {out}/checkpoint-2: {flipped}: sha256 differs from the manifest (corrupted)"
    ), logged
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"--resume {out}/checkpoint-2: the checkpoint fails verification:\n  {flipped}: sha256 differs"
        ),
    ):
        find_resume(out, os.path.join(out, "checkpoint-2"))  # an explicit path is checked too
    truncated = os.path.join(out, "checkpoint-1", checkpoint.TRAINER_STATE)
    with open(truncated, "r+b") as f:
        f.truncate(10)
    os.remove(os.path.join(out, "checkpoint-1", "config.json"))
    with pytest.raises(CheckpointError) as e:
        find_resume(out, "auto", log=logged.append)
    msg = str(e.value)
    assert msg.startswith(f"--resume auto: no checkpoint in {out} verifies")
    for name in (flipped, truncated, os.path.join(out, "checkpoint-1", "config.json")):
        assert name in msg, msg
    assert "missing" in msg and "10 bytes" in msg


def test_no_checkpoint_at_all_starts_fresh_and_a_missing_manifest_is_named(tmp_path, small_model):
    out = str(tmp_path)
    assert find_resume(out, "auto") is None
    save_checkpoint(out, 3, small_model, {"step": 3}, keep=2)
    os.remove(os.path.join(out, "checkpoint-3", manifest.MANIFEST))
    with pytest.raises(CheckpointError, match=re.escape(f"{out}/checkpoint-3/manifest.json: missing")):
        find_resume(out, "auto")


def test_the_cli_reports_bad_checkpoints_without_a_traceback(tmp_path, small_data, small_model):
    out = str(tmp_path / "run")
    save_checkpoint(out, 2, small_model, {"step": 2}, keep=2)
    bad = os.path.join(out, "checkpoint-2", "model.safetensors")
    with open(bad, "r+b") as f:
        f.truncate(64)
    data, images, _ = small_data
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "eagle_fast.train",
            "--recipe",
            "tiny-x5",
            "--data_path",
            data,
            "--image_folder",
            images,
            "--output_dir",
            out,
            "--resume",
            "auto",
            "--max_steps",
            "2",
            "--model_max_length",
            "96",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"error: --resume auto: no checkpoint in {out} verifies; bad files:\n  {bad}: 64 bytes" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_full_disk_leaves_latest_and_removes_the_partial_folder(tmp_path, small_data, monkeypatch):
    real, calls = loop.write_model, []

    def write_model(model, path, *a, **kw):  # the second save's model write hits ENOSPC half-way
        calls.append(path)
        if len(calls) == 2:
            with open(os.path.join(path, "model.safetensors"), "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "model.safetensors"))
        return real(model, path, *a, **kw)

    monkeypatch.setattr(loop, "write_model", write_model)
    trainer = Trainer(_cfg(tmp_path / "run", small_data, max_steps=6))
    with pytest.raises(SaveError) as e:
        trainer.train()
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert sorted(d for d in os.listdir(run) if d.startswith("checkpoint")) == ["checkpoint-2"]  # no .tmp left
    assert manifest.verify(str(run / "checkpoint-2")) == []
    msg = str(e.value)
    needed = checkpoint.estimate_bytes(trainer.model)
    assert msg.startswith(f"saving {run / 'checkpoint-4'} failed: [Errno 28] No space left on device")
    assert f"needs about {needed / 1e9:.2f} GB ({needed} bytes)" in msg and "still names checkpoint-2" in msg
    # the estimate covers what a checkpoint holds: the weights and AdamW's two moments of each
    assert needed >= os.path.getsize(run / "checkpoint-2" / "model.safetensors")
    assert find_resume(str(run), "auto") == str(run / "checkpoint-2")


class _Poison(torch.nn.Module):
    """Wraps the trainer's forward: the loss of the chosen calls becomes NaN; at every call it
    records the trainable weights and the optimizer / scheduler state the step starts from."""

    def __init__(self, trainer, poisoned):
        super().__init__()
        self.inner, self.trainer, self.poisoned, self.calls, self.seen = trainer.net, trainer, poisoned, 0, []

    def forward(self, *a, **kw):
        self.calls += 1
        t = self.trainer
        opt = {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in enumerate(t.optimizer.state.values())
        }
        self.seen.append(
            ({n: p.detach().clone() for n, p in t.model.named_parameters()}, opt, t.scheduler.state_dict())
        )
        out = self.inner(*a, **kw)
        if self.calls in self.poisoned:
            out.loss = out.loss * float("nan")
        return out


def _record_batches(trainer):
    ids, stream = [], trainer._micro_batches

    def recorded():
        for batch in stream():
            ids.append(list(batch["ids"]))
            yield batch

    trainer._micro_batches = recorded
    return ids


def test_a_nan_step_is_skipped_counted_and_named(tmp_path, small_data):
    trainer = Trainer(_cfg(tmp_path / "run", small_data, max_steps=4, save_steps=0))
    net = trainer.net = _Poison(trainer, poisoned={3})
    ids = _record_batches(trainer)
    out = trainer.train()
    # 5 batches: the 3rd (NaN) skipped, so 4 optimizer steps
    assert net.calls == 5 and out["steps"] == 4 and len(out["losses"]) == 4 and out["nonfinite_steps"] == 1
    (w3, o3, s3), (w4, o4, s4) = net.seen[2], net.seen[3]  # before the NaN batch, and after it
    assert _equal(w3, w4) and s3 == s4
    assert o3.keys() == o4.keys() and all(all(torch.equal(o3[k][n], o4[k][n]) for n in o3[k]) for k in o3)
    assert all(float(s["step"]) == 4 for s in trainer.optimizer.state.values())  # AdamW's count: 4, not 5
    assert trainer.scheduler.last_epoch == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    bad = [r for r in rows if r.get("nonfinite")]
    assert len(bad) == 1 and bad[0]["ids"] == ids[2] and bad[0]["step"] == 3 and bad[0]["step_skipped"]
    assert bad[0]["nonfinite_total"] == 1 and bad[0]["loss"] != bad[0]["loss"]  # NaN
    assert [r["step"] for r in rows if not r.get("nonfinite")] == [1, 2, 3, 4]


def test_too_many_nan_steps_in_a_row_stop_the_run_with_latest_on_the_last_good(tmp_path, small_data):
    trainer = Trainer(_cfg(tmp_path / "run", small_data, max_steps=6, save_steps=2, max_nonfinite_steps=2))
    trainer.net = _Poison(trainer, poisoned=set(range(3, 100)))
    ids = _record_batches(trainer)
    with pytest.raises(NonFiniteError) as e:
        trainer.train()
    run = tmp_path / "run"
    msg = str(e.value)
    assert msg.startswith(
        "3 optimizer steps in a row had a non-finite loss or gradient norm (more than --max_nonfinite_steps 2)"
    )
    assert f"records {ids[4]}" in msg and f"`latest` still names {run / 'checkpoint-2'}" in msg
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert sorted(d for d in os.listdir(run) if d.startswith("checkpoint")) == ["checkpoint-2"]
    assert [json.loads(x)["nonfinite_in_a_row"] for x in open(run / "metrics.jsonl") if "nonfinite" in x] == [1, 2, 3]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_pickle_is_refused_by_name(tmp_path, small_model, small_data):
    out = str(tmp_path / "run")
    save_checkpoint(out, 2, small_model, {"step": 2}, keep=2)
    state = os.path.join(out, "checkpoint-2", checkpoint.TRAINER_STATE)
    torch.save({"step": 2, "x": _Payload()}, state)
    manifest.write(os.path.join(out, "checkpoint-2"), 2)  # consistent bytes: only the content is hostile
    assert find_resume(out, "auto") == os.path.join(out, "checkpoint-2")
    with pytest.raises(CheckpointError, match=re.escape(state) + ": refused to load: .*(system|Unsupported global)"):
        safe_load(state)
    with pytest.raises(CheckpointError, match=re.escape(f"{state}: refused to load")):
        Trainer(_cfg(out, small_data, resume="auto")).train()
    adapter = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": _Payload()}, adapter)
    with pytest.raises(CheckpointError, match=re.escape(f"{adapter}: refused to load")):
        Trainer(_cfg(tmp_path / "p", small_data, pretrain_mm_mlp_adapter=str(adapter)))
    assert not os.path.exists(os.path.join(ROOT, "pwned")) and not os.path.exists("pwned")


def test_the_manifest_covers_sub_folders_such_as_deepspeeds_shards(tmp_path):
    folder = tmp_path / "checkpoint-5"
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "trainer_state.pt").write_bytes(b"s" * 10)
    shard = folder / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"o" * 100)
    written = manifest.write(str(folder), 5)
    assert sorted(written["files"]) == ["deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "trainer_state.pt"]
    assert written["files"]["trainer_state.pt"]["bytes"] == 10
    # sha256 of ten b"s", as `printf 'ssssssssss' | sha256sum` gives it
    assert (
        written["files"]["trainer_state.pt"]["sha256"]
        == "4b179810791a19af3bfeafbdcf0aca274d9ac7d5f063b8e0b75189360c0cf3a3"
    )
    assert manifest.verify(str(folder), required=("trainer_state.pt",)) == []
    shard.write_bytes(b"o" * 99)
    assert manifest.verify(str(folder)) == [f"{shard}: 99 bytes, the manifest says 100 (truncated or overwritten)"]


def test_latest_unwritable_takes_the_new_checkpoint_back_out(tmp_path, small_model, monkeypatch):
    out = str(tmp_path)
    save_checkpoint(out, 1, small_model, {"step": 1}, keep=2)

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp")

    monkeypatch.setattr(checkpoint.atomic, "write_text", full)
    with pytest.raises(SaveError, match=re.escape(f"saving {out}/checkpoint-2 failed: [Errno 28]")):
        save_checkpoint(out, 2, small_model, {"step": 2}, keep=2)
    assert sorted(os.listdir(out)) == ["checkpoint-1", "latest"]
    assert checkpoint.read_latest(out) == "checkpoint-1"


def test_pruning_keeps_the_newest_and_drops_checkpoints_past_it(tmp_path, small_model):
    out = str(tmp_path)
    for step in (1, 2, 3, 4):
        save_checkpoint(out, step, small_model, {"step": step}, keep=3)
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    # resumed from checkpoint-2 and saved step 3 again: checkpoint-4 belongs to the abandoned history
    save_checkpoint(out, 3, small_model, {"step": 3}, keep=3)
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
