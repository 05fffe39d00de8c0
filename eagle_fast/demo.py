"""python -m eagle_fast.demo — train, evaluate and chat with a tiny Eagle on the real easy-VQA set,
offline, on a CPU, in minutes (what `make demo` runs).

    python -m eagle_fast.demo                      # everything under runs/demo/
    python -m eagle_fast.demo --llm smollm2        # SmolLM2-135M-Instruct as the LLM (projector + LoRA)

1. easy-VQA (PyPI `easy-vqa`: 64x64 shapes, questions on shape / colour / yes-no) as LLaVA JSONL;
2. a tiny Eagle with the real architecture: a CLIP ViT and a ConvNeXt at their own resolutions,
   channel-concat fusion (resize_concat), an mlp2x_gelu projector, a small Llama (recipe "demo");
3. stage 1 (projector only) then stage 2 (SFT, everything trainable) with `python -m eagle_fast.train`;
   stage 2 runs the shape questions first, then all questions (see SHAPE_PASS_STEPS);
4. `python -m eagle_fast.eval --task easy-vqa` on the test questions; runs/demo/eval.json gets
   {"accuracy", "n", "majority_baseline"};
5. streamed answers from the chat API for two test images, and the command that serves the model.

A finished stage is reused, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from eagle_fast.cli import ConfigParser


@dataclass
class DemoConfig:
    out: str | None = field(default=None, metadata={"help": "output folder (default: runs/demo, runs/demo-smollm2)"})
    llm: Literal["tiny", "smollm2"] = field(default="tiny", metadata={
        "help": "tiny: the recipe's own small Llama; smollm2: SmolLM2-135M-Instruct (projector + LoRA)"})
    # SMOLLM2_STEPS when None for smollm2: a 135M-parameter LLM on 2 CPU cores runs ~30x slower per step
    max_steps: int | None = field(default=None, metadata={"help": "cap each training stage (a shortened run)"})
    eval_limit: int | None = field(default=None, metadata={
        "help": "evaluate the first N test questions only (default: all 9,673; smollm2: 1000)"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps (an interrupted stage resumes)"})

    def __post_init__(self) -> None:
        if self.out is None:
            self.out = "runs/demo" if self.llm == "tiny" else "runs/demo-smollm2"


# The SmolLM2 variant's schedule: stage 1 on half the captions, stage 2 on 4800 questions (an
# eighth of an epoch), evaluated on the first 1000 test questions. Measured here (2 cores) at batch
# 32: ~8.5 s per stage-1 step, ~10 s per stage-2 (LoRA) step, so about 40 minutes in all.
SMOLLM2_STEPS = {"pretrain": 60, "sft": 150}
SMOLLM2_EVAL = 1000

# Stage 2 of the tiny demo first trains on the shape questions alone (500 steps of 32: about three
# passes over them), then on all questions. Trained from scratch in minutes on the whole mix, the
# experts learn colour and never shape (their features then hold no linearly readable shape: 43% on
# three shapes, where the shape pass alone gives 79%), and shape questions stay at chance.
SHAPES = ("circle", "rectangle", "triangle")
SHAPE_PASS_STEPS = 500


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _stage_args(cfg: DemoConfig, stage: str, steps: int | None = None) -> list[str]:
    args = ["--save_steps", str(cfg.save_steps), "--resume", "auto"]
    if cfg.max_steps is not None or steps is None:
        steps = cfg.max_steps if cfg.max_steps is not None or cfg.llm != "smollm2" else SMOLLM2_STEPS[stage]
    if steps is not None:
        args += ["--max_steps", str(steps)]
    if cfg.llm == "smollm2":
        from eagle_fast.demo_smollm2 import llm_dir

        args += ["--model_name_or_path", llm_dir(os.path.join(cfg.out, "smollm2-hf")), "--tokenizer_name_or_path",
                 "none", "--version", "chatml"]
    return args


def shape_questions(cfg: DemoConfig) -> tuple[str, str]:
    """The built-in SFT questions whose answer is a shape, as their own JSONL (written once):
    stage 2's first pass. Returns (jsonl, image_folder)."""
    from eagle_fast.data.builtin import easy_vqa_dataset

    data = easy_vqa_dataset(os.path.join(cfg.out, "data"), questions_per_record=1)
    path = os.path.join(cfg.out, "data", "sft-shapes.jsonl")
    if not os.path.exists(path):
        with open(data.sft, encoding="utf-8") as f, open(path + ".tmp", "w", encoding="utf-8") as out:
            for line in f:
                if json.loads(line)["conversations"][-1]["value"] in SHAPES:
                    out.write(line)
        os.replace(path + ".tmp", path)
    return path, data.image_folder


def train(cfg: DemoConfig) -> str:
    """Stage 1 (projector only), then stage 2 (SFT, everything trainable) in two passes for the
    tiny LLM: the shape questions first, then all questions. Finished stages are reused."""
    py = [sys.executable, "-m", "eagle_fast.train", "--recipe", "demo"]
    pre, shapes, sft = (os.path.join(cfg.out, d) for d in ("pretrain", "sft-shapes", "sft"))
    adapter = ["--pretrain_mm_mlp_adapter", os.path.join(pre, "mm_projector.bin")]
    if not os.path.exists(os.path.join(pre, "mm_projector.bin")):
        _run(py + ["--stage", "pretrain", "--output_dir", pre] + _stage_args(cfg, "pretrain"))
    else:
        print(f"stage 1: reusing {pre}/mm_projector.bin")
    if cfg.llm == "tiny":
        if not os.path.exists(os.path.join(shapes, "final", "config.json")):
            data, folder = shape_questions(cfg)
            _run(py + ["--stage", "sft", "--output_dir", shapes, "--data_path", data, "--image_folder", folder,
                       "--tokenizer_name_or_path", os.path.join(pre, "final")] + adapter
                 + _stage_args(cfg, "sft", SHAPE_PASS_STEPS))
        else:
            print(f"stage 2, shape pass: reusing {shapes}/final")
        start = ["--model_name_or_path", os.path.join(shapes, "final")]
    else:
        start = adapter
    if not os.path.exists(os.path.join(sft, "final", "config.json")):
        extra = ["--lora_enable", "true"] if cfg.llm == "smollm2" else []
        _run(py + ["--stage", "sft", "--output_dir", sft] + start + _stage_args(cfg, "sft") + extra)
    else:
        print(f"stage 2: reusing {sft}/final")
    return os.path.join(sft, "final")


def template(cfg: DemoConfig) -> str:
    from eagle_fast.train.config import recipe

    return "chatml" if cfg.llm == "smollm2" else recipe("demo", "sft").version


def evaluate(cfg: DemoConfig, model: str) -> dict:
    out = os.path.join(cfg.out, "eval")
    cmd = [sys.executable, "-m", "eagle_fast.eval", "--model", model, "--task", "easy-vqa", "--out", out,
           "--template", template(cfg), "--batch_size", "64",
           "--overwrite"]  # predictions of an earlier demo model in this folder are replaced, not mixed in
    limit = cfg.eval_limit if cfg.eval_limit is not None or cfg.llm != "smollm2" else SMOLLM2_EVAL
    if limit is not None:
        cmd += ["--limit", str(limit)]
    _run(cmd)
    with open(os.path.join(out, "easy-vqa.results.json")) as f:
        res = json.load(f)
    summary = {"accuracy": res["accuracy"], "n": res["n"], "majority_baseline": res["majority_baseline"]}
    with open(os.path.join(cfg.out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def chat(cfg: DemoConfig, model_dir: str) -> None:
    from eagle_fast.data.builtin import easy_vqa_dataset
    from eagle_fast.data.images import load_image_file
    from eagle_fast.inference import ChatSession, load_model

    data = easy_vqa_dataset(os.path.join(cfg.out, "eval", "easy-vqa-data"))
    with open(data.eval) as f:
        first = [json.loads(next(f)) for _ in range(40)]
    images = list(dict.fromkeys(r["image"] for r in first))[:2]
    model, tok, proc = load_model(model_dir)
    for name in images:
        session = ChatSession(model, tok, proc, template=template(cfg), temperature=0, max_new_tokens=16)
        img = load_image_file(name, data.image_folder)
        for q in ("What shape is in the image?", "What color is the shape?"):
            print(f"[{name}] USER: {q}\n[{name}] ASSISTANT: ", end="", flush=True)
            for delta in session.send(q, images=[img] if not session.history else None, stream=True):
                print(delta, end="", flush=True)
            print()


def main(argv: list[str] | None = None) -> int:
    p = ConfigParser("python -m eagle_fast.demo", __doc__)
    p.add_config(DemoConfig)
    cfg = DemoConfig(**p.parse_given(argv))
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    model_dir = train(cfg)
    t_train = time.time() - t0
    summary = evaluate(cfg, model_dir)
    t_eval = time.time() - t0 - t_train
    chat(cfg, model_dir)
    print(f"\neasy-VQA test accuracy {100 * summary['accuracy']:.1f}% on {summary['n']} questions "
          f"(majority-answer baseline {100 * summary['majority_baseline']:.1f}%) -> {cfg.out}/eval.json")
    print(f"time: training {t_train / 60:.1f} min, evaluation {t_eval / 60:.1f} min, total "
          f"{(time.time() - t0) / 60:.1f} min")
    print(f"chat in the browser:  python -m eagle_fast.serve --model {model_dir} --template {template(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
