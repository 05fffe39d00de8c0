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

from eagle_fast.train.__main__ import parse
from eagle_fast.train.checkpoint import find_resume, load_model_weights, save_checkpoint
from eagle_fast.train.config import recipe
from eagle_fast.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(tmp_path, small_data, **kw):
    data, images, _ = small_data
    base = dict(output_dir=str(tmp_path / "run"), data_path=data, image_folder=images, per_device_train_batch_size=4,
                max_steps=30, save_steps=0, model_max_length=96)
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
    assert set(saved) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                          "model.mm_projector.2.bias"}
    sft = Trainer(_cfg(tmp_path / "sft", small_data, max_steps=1, pretrain_mm_mlp_adapter=str(bin_path)))
    for k, v in saved.items():
        assert torch.equal(sft.model.state_dict()[k], v)


def _run(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "eagle_fast.train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill_9_is_bitwise_exact(tmp_path, small_data):
    data, images, _ = small_data
    common = ["--recipe", "tiny-x5", "--data_path", data, "--image_folder", images, "--per_device_train_batch_size",
              "2", "--max_steps", "8", "--model_max_length", "96", "--save_steps", "2", "--save_total_limit", "2"]
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


def test_cli_maps_original_flags():
    cfg = parse(["--recipe", "eagle-x5-7b", "--model_name_or_path", "lmsys/vicuna-7b-v1.5", "--version", "plain",
                 "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2", "--bf16", "True",
                 "--learning_rate", "1e-3", "--group_by_modality_length", "--set", "save_steps=10"])
    assert cfg.stage == "pretrain" and cfg.model_name_or_path == "lmsys/vicuna-7b-v1.5" and cfg.bf16
    assert cfg.learning_rate == 1e-3 and cfg.group_by_modality_length and cfg.save_steps == 10
    assert cfg.extra == {"mm_vision_select_layer": "-2"} and cfg.deepspeed == "zero2"
    with pytest.raises(SystemExit):
        parse(["--set", "no_such_option=1"])


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, small_data):
    data, images, _ = small_data
    out = tmp_path_factory.mktemp("one")
    one = _run(_DIST_COMMON(data, images) + ["--per_device_train_batch_size", "4", "--output_dir", str(out)])
    assert one.wait(timeout=600) == 0, one.stderr.read()
    return out


def _DIST_COMMON(data, images):
    return ["--recipe", "tiny-x5", "--data_path", data, "--image_folder", images, "--max_steps", "4",
            "--model_max_length", "96", "--save_steps", "0"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_ranks_agree_with_one_process(tmp_path, small_data, one_process_run, engine):
    """torchrun, 2 CPU ranks (gloo), 2 records each per step == 1 process with 4 per step: DDP, FSDP2,
    and DeepSpeed ZeRO-2 / ZeRO-3 with the configs shipped in the package."""
    data, images, _ = small_data
    common = _DIST_COMMON(data, images) + {"ddp": [], "fsdp": ["--fsdp", "true"]}.get(engine, ["--deepspeed", engine])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    port = {"ddp": "29531", "zero2": "29532", "zero3": "29533", "fsdp": "29537"}[engine]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, "-m", "eagle_fast.train", *common, "--per_device_train_batch_size", "2",
                          "--output_dir", str(tmp_path / "two")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(one_process_run / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    la = [json.loads(x)["loss"] for x in open(one_process_run / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(la) == len(lb) == 4 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (la, lb)


def test_lora_adapters_save_reload_and_merge_to_the_same_logits(tmp_path, small_data):
    from transformers import AutoModelForCausalLM

    from eagle_fast.train.lora import load_lora, merge_lora

    trainer = Trainer(_cfg(tmp_path, small_data, max_steps=3, lora_enable=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0, learning_rate=1e-2))
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "mm_projector" in n or ".vision_tower." in n for n in trained)
    assert any("lora_" in n for n in trained) and any("mm_projector" in n for n in trained)
    trainer.train()
    trainer.model.eval()
    batch = trainer.collate([trainer.dataset[i] for i in range(2)])
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        want = trainer.model(*args, images=batch["images"]).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base").eval()
        assert (base(*args, images=batch["images"]).logits - want).abs().max() > 1e-4  # training changed it
        reloaded = load_lora(base, str(tmp_path / "run" / "final")).eval()
        assert (reloaded(*args, images=batch["images"]).logits - want).abs().max() < 1e-5
        merged = merge_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base"),
                            str(tmp_path / "run" / "final"), out_dir=str(tmp_path / "merged")).eval()
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
    ports = {"zero2": ("29534", "29535", "29536"), "fsdp": ("29538", "29539", "29540")}[engine]

    def launch(out, port, *extra):
        args = _DIST_COMMON(data, images)
        args[args.index("--save_steps") + 1] = "2"
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", port, "-m", "eagle_fast.train", *args,
                                 "--per_device_train_batch_size", "2", *engine_args, "--output_dir", str(out),
                                 *extra], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    full = launch(tmp_path / "full", ports[0])
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    victim = launch(tmp_path / "cut", ports[1])
    latest = tmp_path / "cut" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "checkpoint-2"):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks
    victim.wait()
    assert not (tmp_path / "cut" / "final").exists()  # it really was cut short
    resumed = launch(tmp_path / "cut", ports[2], "--resume", "auto")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prealign_trains_one_expert_against_a_frozen_llm_and_exports_it(tmp_path, small_data):
    cfg = _cfg(tmp_path, small_data, max_steps=3, vision_tower="sam-1024", learning_rate=1e-2).replace(
        stage="prealign")
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
    lines.append(json.dumps({"id": "broken", "image": "nope.png", "conversations": json.loads(lines[0])["conversations"]}))
    bad.write_text("\n".join(lines) + "\n")
    out = Trainer(_cfg(tmp_path, small_data, data_path=str(bad), max_steps=4, per_device_train_batch_size=2,
                       max_bad_fraction=1.0)).train()
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
