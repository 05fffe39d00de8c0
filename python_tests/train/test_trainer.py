"""The trainer on the tiny recipe (CPU): loss falls, stage-1 trains only the projector and its
mm_projector.bin feeds stage 2, resume after a real kill -9 is bitwise exact, a checkpoint cut
short leaves the previous one in force, and the CLI maps the original flags."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from eagle_fast.data import EagleCollator
from eagle_fast.train.__main__ import parse
from eagle_fast.train.checkpoint import find_resume, load_model_weights, save_checkpoint
from eagle_fast.train.config import recipe
from eagle_fast.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(tmp_path, small_data, **kw):
    data, images, _ = small_data
    base = dict(
        output_dir=str(tmp_path / "run"),
        data_path=data,
        image_folder=images,
        per_device_train_batch_size=4,
        max_steps=30,
        save_steps=0,
        model_max_length=96,
    )
    base.update(kw)
    return recipe("tiny-x5", "sft", **base)


def test_loss_falls_over_30_steps(tmp_path, small_data):
    out = Trainer(_cfg(tmp_path, small_data, learning_rate=3e-3)).train()
    losses = out["losses"]
    assert len(losses) == 30 and losses[-1] < 0.6 * losses[0], losses
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 31)) and all("loss" in r for r in rows)
    assert (tmp_path / "run" / "final" / "config.json").exists() and (tmp_path / "run" / "loss.png").exists()


def test_pretrain_trains_only_the_projector_and_feeds_sft(tmp_path, small_data):
    cfg = _cfg(tmp_path, small_data, max_steps=3, version="plain", data_path=small_data[2])
    cfg = cfg.replace(stage="pretrain")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.mm_projector.") for k in changed), sorted(changed)[:5]
    bin_path = tmp_path / "run" / "mm_projector.bin"
    saved = torch.load(bin_path, weights_only=True)
    assert set(saved) == {
        "model.mm_projector.0.weight",
        "model.mm_projector.0.bias",
        "model.mm_projector.2.weight",
        "model.mm_projector.2.bias",
    }
    sft = Trainer(_cfg(tmp_path / "sft", small_data, max_steps=1, pretrain_mm_mlp_adapter=str(bin_path)))
    for k, v in saved.items():
        assert torch.equal(sft.model.state_dict()[k], v)


def _run(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "eagle_fast.train", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_kill_9_is_bitwise_exact(tmp_path, small_data):
    data, images, _ = small_data
    common = [
        "--recipe",
        "tiny-x5",
        "--data_path",
        data,
        "--image_folder",
        images,
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "8",
        "--model_max_length",
        "96",
        "--save_steps",
        "2",
        "--save_total_limit",
        "2",
    ]
    full = _run(common + ["--output_dir", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stderr.read()
    victim = _run(common + ["--output_dir", str(tmp_path / "cut")])
    latest = tmp_path / "cut" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() == "checkpoint-4":
            break
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "final").exists()
    resumed = _run(common + ["--output_dir", str(tmp_path / "cut"), "--resume", "auto"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "full" / "checkpoint-8" / "trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "cut" / "checkpoint-8" / "trainer_state.pt", weights_only=False)
    assert (sa["epoch"], sa["position"]) == (sb["epoch"], sb["position"])
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_checkpoint_cut_short_leaves_the_previous_one(tmp_path):
    from eagle_fast.model import EagleLlamaForCausalLM, presets

    model = EagleLlamaForCausalLM(presets.get("eagle-tiny-clip"))
    out = str(tmp_path)
    save_checkpoint(out, 1, model, {"step": 1}, keep=2)

    class Dying(torch.nn.Module):  # dies half-way through writing, like a kill during the save
        def save_pretrained(self, path, **kw):
            open(os.path.join(path, "model.safetensors"), "wb").write(b"partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 2, Dying(), {"step": 2}, keep=2)
    assert find_resume(out, "auto") == os.path.join(out, "checkpoint-1")
    fresh = EagleLlamaForCausalLM(presets.get("eagle-tiny-clip"))
    load_model_weights(fresh, find_resume(out, "auto"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    save_checkpoint(out, 3, model, {"step": 3}, keep=1)  # the next save cleans up and prunes
    assert sorted(os.listdir(out)) == ["checkpoint-3", "latest"]


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory, small_data):
    """The model every run below starts from: the recipe's random weights, saved once (the runs
    load it: under ZeRO-3, new weights are drawn module by module on rank 0, so a random start
    would differ from a one-process run's)."""
    from eagle_fast.train.checkpoint import write_model

    data, images, _ = small_data
    out = tmp_path_factory.mktemp("init")
    cfg = parse(_DIST_COMMON(data, images) + ["--output_dir", str(out / "run")])
    with torch.random.fork_rng():
        t = Trainer(cfg)
    write_model(t.model, str(out / "model"), savers=(t.tokenizer, t.processor))
    return out / "model"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, small_data, init_checkpoint):
    data, images, _ = small_data
    out = tmp_path_factory.mktemp("one")
    one = _run(
        _DIST_COMMON(data, images)
        + ["--per_device_train_batch_size", "4", "--output_dir", str(out), "--model_name_or_path", str(init_checkpoint)]
    )
    assert one.wait(timeout=600) == 0, one.stderr.read()
    return out


# a rendezvous on a free port: fixed ports collide with any other run on the machine (or a
# previous launch's socket still closing) and fail at random
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _DIST_COMMON(data, images):
    return [
        "--recipe",
        "tiny-x5",
        "--data_path",
        data,
        "--image_folder",
        images,
        "--max_steps",
        "4",
        "--model_max_length",
        "96",
        "--save_steps",
        "0",
    ]


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_ranks_agree_with_one_process(tmp_path, small_data, init_checkpoint, one_process_run, engine):
    """torchrun, 2 CPU ranks (gloo), 2 records each per step == 1 process with 4 per step: DDP, FSDP2,
    and DeepSpeed ZeRO-2 / ZeRO-3 with the configs shipped in the package. Every process runs one
    thread; the two runs still add the batch's gradients up in another order. Rank 1 builds the
    model on the meta device (ZeRO-3: partitioned) and never reads the weights file: its weights
    come from rank 0.

    Tolerances, from the problem: the losses are forward sums over the same tokens, equal up to
    float rounding (rtol 1e-5). The weights are not compared element by element: AdamW divides each
    gradient by its running magnitude, so an element whose gradient nearly cancels (a sum of terms
    far larger than the result) can take a step of any size up to the learning rate from rounding
    alone. What the ranks must agree on is the update as a whole: ||w_two - w_one|| at most 1e-3 of
    ||w_one - w_init||, the size of the 4 steps both took."""
    data, images, _ = small_data
    common = _DIST_COMMON(data, images) + {"ddp": [], "fsdp": ["--fsdp", "true"]}.get(engine, ["--deepspeed", engine])
    common += ["--model_name_or_path", str(init_checkpoint)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            *TORCHRUN_2,
            "-m",
            "eagle_fast.train",
            *common,
            "--per_device_train_batch_size",
            "2",
            "--output_dir",
            str(tmp_path / "two"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    built = "partitioned (deepspeed.zero.Init)" if engine == "zero3" else "on the meta device, weights from rank 0"
    assert f"rank 1: model built {built}" in two.stdout, two.stdout[-2000:]
    from safetensors.torch import load_file

    la = [json.loads(x)["loss"] for x in open(one_process_run / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(la) == len(lb) == 4 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(la, lb)), (la, lb)
    a = load_file(str(one_process_run / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    init = load_file(str(init_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and set(a) <= set(init)
    moved = sum(float((a[k].double() - init[k].double()).square().sum()) for k in a) ** 0.5
    apart = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5
    assert moved > 0 and apart <= 1e-3 * moved, (apart, moved)


def test_lora_adapters_save_reload_and_merge_to_the_same_logits(tmp_path, small_data):
    from transformers import AutoModelForCausalLM

    from eagle_fast.train.lora import load_lora, merge_lora

    trainer = Trainer(
        _cfg(
            tmp_path,
            small_data,
            max_steps=3,
            lora_enable=True,
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            learning_rate=1e-2,
        )
    )
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "mm_projector" in n or ".vision_tower." in n for n in trained)
    assert any("lora_" in n for n in trained) and any("mm_projector" in n for n in trained)
    trainer.train()
    trainer.model.eval()
    batch = EagleCollator(trainer.tokenizer.pad_token_id)([trainer.dataset[i] for i in range(2)])  # padded rows
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        want = trainer.model(*args, images=batch["images"]).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base").eval()
        assert (base(*args, images=batch["images"]).logits - want).abs().max() > 1e-4  # training changed it
        reloaded = load_lora(base, str(tmp_path / "run" / "final")).eval()
        assert (reloaded(*args, images=batch["images"]).logits - want).abs().max() < 1e-5
        merged = merge_lora(
            AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base"),
            str(tmp_path / "run" / "final"),
            out_dir=str(tmp_path / "merged"),
        ).eval()
        assert type(merged).__name__ == "EagleLlamaForCausalLM"
        assert (merged(*args, images=batch["images"]).logits - want).abs().max() < 1e-4
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (again(*args, images=batch["images"]).logits - want).abs().max() < 1e-4
        # the run's final/ loads directly: its base (saved beside it) found from adapter_config.json
        from eagle_fast.inference import load_model

        loaded = load_model(str(tmp_path / "run" / "final"))[0]
        assert (loaded(*args, images=batch["images"]).logits - want).abs().max() < 1e-4


@pytest.mark.parametrize("engine", ["zero2", "fsdp"])
def test_two_rank_resume_after_kill_9_is_bitwise_exact(tmp_path, small_data, engine):
    """ZeRO-2 or FSDP2 over 2 ranks, checkpoints every 2 steps: kill -9 the whole launch after
    checkpoint-2, resume, and the weights after 4 steps equal those of an uninterrupted run."""
    data, images, _ = small_data
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    engine_args = ["--fsdp", "true"] if engine == "fsdp" else ["--deepspeed", engine]

    def launch(out, *extra):
        args = _DIST_COMMON(data, images)
        args[args.index("--save_steps") + 1] = "2"
        return subprocess.Popen(
            [
                *TORCHRUN_2,
                "-m",
                "eagle_fast.train",
                *args,
                "--per_device_train_batch_size",
                "2",
                *engine_args,
                "--output_dir",
                str(out),
                *extra,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    full = launch(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    victim = launch(tmp_path / "cut")
    latest = tmp_path / "cut" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "checkpoint-2"):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks
    victim.wait()
    assert not (tmp_path / "cut" / "final").exists()  # it really was cut short
    resumed = launch(tmp_path / "cut", "--resume", "auto")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prealign_trains_one_expert_against_a_frozen_llm_and_exports_it(tmp_path, small_data):
    cfg = _cfg(tmp_path, small_data, max_steps=3, vision_tower="sam-1024", learning_rate=1e-2).replace(stage="prealign")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".vision_tower.vision_towers.0." in k for k in changed)
    assert any("mm_projector" in k for k in changed)
    assert all("mm_projector" in k or ".vision_tower." in k for k in changed)  # the LLM is frozen
    exported = tmp_path / "run" / "prealigned" / "sam-1024.safetensors"
    assert exported.exists()
    sft = Trainer(_cfg(tmp_path / "sft", small_data, max_steps=1, prealigned_experts=str(exported.parent)))
    sam = sft.model.model.vision_tower.vision_towers[2]
    assert sam.spec.name == "sam-1024"
    trained = trainer.model.model.vision_tower.vision_towers[0].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in sam.state_dict().items())
    with pytest.raises(ValueError, match="one non-CLIP expert"):
        Trainer(_cfg(tmp_path / "bad", small_data, max_steps=1).replace(stage="prealign"))


def test_bad_records_are_reported_each_epoch(tmp_path, small_data, capsys):
    data, images, _ = small_data
    bad = tmp_path / "with_bad.jsonl"
    lines = open(data).read().splitlines()[:4]
    lines.append(
        json.dumps({"id": "broken", "image": "nope.png", "conversations": json.loads(lines[0])["conversations"]})
    )
    bad.write_text("\n".join(lines) + "\n")
    out = Trainer(
        _cfg(tmp_path, small_data, data_path=str(bad), max_steps=4, per_device_train_batch_size=2, max_bad_fraction=1.0)
    ).train()
    printed = capsys.readouterr().out
    assert "epoch 0: skipped records {'missing_image': 1}" in printed
    assert set(out["skipped"]) == {"missing_image"}  # counted again whenever a later epoch reads it


def test_torch_compile_trains_like_eager(tmp_path, small_data):
    """--torch_compile: the compiled forward/backward (graph breaks at the splice) gives the eager
    losses and weights (CLIP-only mixture to keep CPU compilation short)."""
    from safetensors.torch import load_file

    kw = dict(max_steps=2, vision_tower="clip-448", per_device_train_batch_size=2)
    eager = Trainer(_cfg(tmp_path / "e", small_data, **kw)).train()
    compiled = Trainer(_cfg(tmp_path / "c", small_data, torch_compile=True, **kw)).train()
    assert all(abs(a - b) < 1e-4 for a, b in zip(eager["losses"], compiled["losses"])), (eager, compiled)
    a = load_file(str(tmp_path / "e" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "c" / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_metrics_rows_every_logging_steps_and_no_duplicates_after_a_resume(tmp_path, small_data):
    """A row per `logging_steps` steps (and the last), its loss the interval's mean; a run resumed
    from checkpoint-2 after writing rows 3 and 4 (and half a line) replaces them: one row per step."""
    cfg = _cfg(tmp_path, small_data, max_steps=5, logging_steps=2)
    losses = Trainer(cfg).train()["losses"]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["step"], r["steps"]) for r in rows] == [(2, 2), (4, 2), (5, 1)]
    assert rows[0]["loss"] == pytest.approx(sum(losses[:2]) / 2) and rows[2]["loss"] == pytest.approx(losses[4])

    out = tmp_path / "again"
    cfg = _cfg(out, small_data, max_steps=4, save_steps=2, save_total_limit=3)
    first = Trainer(cfg).train()["losses"]
    # as if killed after step 4's row, before its checkpoint: back to checkpoint-2, half a row written
    (out / "run" / "latest").write_text("checkpoint-2")
    with open(out / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    again = Trainer(cfg.replace(resume="auto")).train()["losses"]
    rows = [json.loads(x) for x in open(out / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == first[:2] + again and again == first[2:]
