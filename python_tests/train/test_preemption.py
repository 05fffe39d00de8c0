"""Stopping on SIGTERM / SIGUSR1 (slurm's preemption and time-limit warning): the step in progress
finishes, one checkpoint is written, the process exits 0, and resuming from it ends bitwise equal
to an uninterrupted run (one process, and two gloo ranks of which only one was signalled). The
handlers exist only while a run trains; the slurm example waits for its ranks and requeues."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import torch

from eagle_fast.train.config import recipe
from eagle_fast.train.loop import Trainer
from eagle_fast.train.signals import StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _weights(run):
    from safetensors.torch import load_file

    return load_file(os.path.join(run, "final", "model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_handlers_are_the_runs_own_and_restored_after_it():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while stop.received is None and time.time() < deadline:  # delivered between bytecodes
            time.sleep(0.01)
        assert stop.received == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in before} == before
    # importing the trainer installs nothing
    code = (
        "import signal; a = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1); "
        "import eagle_fast.train.loop, eagle_fast.train.__main__; "
        "assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == a"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).returncode == 0


def test_a_run_that_cannot_finish_after_the_signal_exits_1_at_the_timeout():
    code = (
        "import os, signal, time; from eagle_fast.train.signals import StopSignals\n"
        "with StopSignals(timeout_s=0.5):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)  # a save that never ends\n"
    )
    t0 = time.time()
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and time.time() - t0 < 30, run.stderr
    assert "SIGTERM: the run did not save and exit within 0.5 s (stop_timeout_s)" in run.stderr


class _SignalAt(torch.nn.Module):
    """The trainer's forward, sending this process `sig` during call `at` (mid-step)."""

    def __init__(self, net, at, sig=signal.SIGTERM):
        super().__init__()
        self.inner, self.at, self.sig, self.calls = net, at, sig, 0

    def forward(self, *a, **kw):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return self.inner(*a, **kw)


def test_sigterm_mid_step_saves_once_and_the_resumed_run_ends_bitwise_equal(tmp_path, small_data):
    data, images, _ = small_data
    kw = dict(
        data_path=data,
        image_folder=images,
        per_device_train_batch_size=2,
        max_steps=6,
        save_steps=0,
        model_max_length=96,
        gradient_accumulation_steps=2,
    )
    Trainer(recipe("tiny-x5", "sft", output_dir=str(tmp_path / "full"), **kw)).train()
    before = signal.getsignal(signal.SIGTERM)
    cut = Trainer(recipe("tiny-x5", "sft", output_dir=str(tmp_path / "cut"), **kw))
    cut.net = _SignalAt(cut.net, at=5)  # the first micro-batch of step 3 (2 per step)
    out = cut.train()
    assert out["stopped"] == "SIGTERM" and out["steps"] == 3 and cut.net.calls == 6  # step 3 completed
    assert signal.getsignal(signal.SIGTERM) is before
    run = tmp_path / "cut"
    assert (run / "latest").read_text().strip() == "checkpoint-3" and not (run / "final").exists()
    assert sorted(d for d in os.listdir(run) if d.startswith("checkpoint")) == ["checkpoint-3"]
    again = Trainer(recipe("tiny-x5", "sft", output_dir=str(run), resume="auto", **kw)).train()
    assert again["stopped"] is None and len(again["losses"]) == 3
    assert _equal(_weights(tmp_path / "cut"), _weights(tmp_path / "full"))
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def _rank_pid(launcher_pid, rank, timeout=120):
    """The pid of the worker with RANK=`rank` among the launcher's children (from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != launcher_pid:
                    continue
                with open(f"/proc/{p}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(p)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under pid {launcher_pid}")


def test_two_ranks_stop_together_when_one_is_signalled_and_resume_bitwise(tmp_path, small_data):
    """SIGTERM to rank 1 alone: both ranks stop after the same step (the flag is all-reduced), one
    checkpoint, the launch exits 0; the resumed run ends equal to an uninterrupted one."""
    data, images, _ = small_data
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    args = [
        "-m",
        "eagle_fast.train",
        "--recipe",
        "tiny-x5",
        "--data_path",
        data,
        "--image_folder",
        images,
        "--max_steps",
        "8",
        "--model_max_length",
        "96",
        "--save_steps",
        "0",
        "--per_device_train_batch_size",
        "2",
    ]

    def launch(out, *extra):
        return subprocess.Popen(
            [*TORCHRUN_2, *args, "--output_dir", str(out), *extra],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    full = launch(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    victim = launch(tmp_path / "cut")
    rank1 = _rank_pid(victim.pid, 1)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        time.sleep(0.02)
    os.kill(rank1, signal.SIGTERM)
    stdout, stderr = victim.communicate(timeout=600)
    assert victim.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])  # rank 0's summary: it got no signal itself
    assert result["stopped"] == "another rank" and 2 <= result["steps"] < 8, result
    assert "rank 1: SIGTERM received" in stderr
    latest = (tmp_path / "cut" / "latest").read_text().strip()
    assert latest == f"checkpoint-{result['steps']}" and not (tmp_path / "cut" / "final").exists()
    resumed = launch(tmp_path / "cut", "--resume", "auto")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert _equal(_weights(tmp_path / "cut"), _weights(tmp_path / "full"))


SBATCH = os.path.join(ROOT, "examples", "slurm", "eagle_x5_7b.sbatch")


def _fake_cluster(tmp_path):
    """srun, scontrol and python stand-ins that log what they are asked; the fake trainer sleeps
    FAKE_SLEEP seconds and, with FAKE_FINISH set, leaves what a finished stage leaves."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    scripts = {
        "srun": 'echo "srun $*" >> "$LOG"\nwhile [ "$1" != bash ]; do shift; done\n'
        'SLURM_PROCID=9 SLURM_LOCALID=1 SLURM_NTASKS=32 "$@"\n',
        "scontrol": 'if [ "$1" = show ]; then echo node-a; echo node-b; else echo "scontrol $*" >> "$LOG"; fi\n',
        "python": 'echo "python RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE $*" >> "$LOG"\n'
        'sleep "${FAKE_SLEEP:-0}"\nif [ -n "${FAKE_FINISH:-}" ]; then case "$*" in\n'
        '  *"--stage pretrain"*) mkdir -p "$OUT/pretrain"; touch "$OUT/pretrain/mm_projector.bin";;\n'
        '  *) mkdir -p "$OUT/sft/final";; esac; fi\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        LOG=str(log),
        LLM="/m",
        DATA="/d",
        OUT=str(tmp_path / "out"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
    )
    return env, log


def test_slurm_example_requeues_a_stopped_stage_and_survives_the_signal_itself(tmp_path):
    text = open(SBATCH).read()
    assert "#SBATCH --signal=USR1@90" in text and "#SBATCH --requeue" in text
    env, log = _fake_cluster(tmp_path)
    # the ranks exit 0 without finishing (stopped by a signal): requeued, the next stage not started
    run = subprocess.Popen(["bash", SBATCH], env=dict(env, FAKE_SLEEP="1"), stdout=subprocess.PIPE, text=True)
    time.sleep(0.4)
    run.send_signal(signal.SIGTERM)  # a preemption signals the batch shell too: it must keep waiting
    stdout, _ = run.communicate(timeout=60)
    assert run.returncode == 0 and "signal received" in stdout, stdout
    lines = log.read_text().splitlines()
    assert [x.split()[0] for x in lines] == ["srun", "python", "scontrol"], lines
    assert lines[1].startswith(
        "python RANK=9 LOCAL_RANK=1 WORLD_SIZE=32 -m eagle_fast.train --recipe eagle-x5-7b --stage pretrain"
    )
    assert lines[2] == "scontrol requeue 4242"
    # both stages finishing: no requeue
    log.unlink()
    done = subprocess.run(["bash", SBATCH], env=dict(env, FAKE_FINISH="1"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert [x.split()[0] for x in lines] == ["srun", "python", "srun", "python"], lines
    assert "--stage sft" in lines[3]
