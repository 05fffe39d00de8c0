"""The slurm example is valid bash and its training commands parse into the official recipes'
configurations (global batch 256 / 128 on its 4 x 8 GPUs)."""

import os
import re
import shlex
import subprocess

from eagle_fast.train.__main__ import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "examples", "slurm", "eagle_x5_7b.sbatch")


def _launches(text: str) -> list[list[str]]:
    joined = text.replace("\\\n", " ")
    env = {"LLM": "/m/vicuna", "DATA": "/d", "OUT": "/o"}
    calls = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("launch --"):
            line = re.sub(r'"\$(\w+)(/[^"]*)?"', lambda m: env[m.group(1)] + (m.group(2) or ""), line)
            calls.append(shlex.split(line)[1:])
    return calls


def test_slurm_example_parses_into_the_official_recipes():
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0
    text = open(SBATCH).read()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    pre, sft = (parse(argv) for argv in _launches(text))
    assert (pre.stage, sft.stage) == ("pretrain", "sft") and pre.model_name_or_path == "/m/vicuna"
    assert sft.pretrain_mm_mlp_adapter == "/o/pretrain/mm_projector.bin" and sft.resume == pre.resume == "auto"
    world = nodes * gpus
    assert pre.per_device_train_batch_size * pre.gradient_accumulation_steps * world == 256
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps * world == 128
    assert pre.deepspeed == sft.deepspeed == "zero2" and sft.bf16 and sft.gradient_checkpointing
