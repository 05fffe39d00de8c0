"""The GPU check's in-process bodies, one per subprocess: `python checks.py NAME RESULT.json`.

    chat            ChatSession greedy replies of a random eagle-tiny-x5, CPU fp32 against GPU fp32
                    (TF32 off): two turns, one image, 24 new tokens each, equal text
    sft7b           one eagle-x5-7b SFT micro-step (forward + backward), random bf16 weights,
                    gradient checkpointing, 4 easy-VQA records: peak memory and tokens/s
    attention       eagle_fast's attention against SDPA, TFLOP/s, head dim 64 non-causal and
                    128 causal (eagle_fast.bench.attention's sweep, two points each)
    lce             linear_cross_entropy against eager at a 128k vocabulary, every row learned:
                    forward + backward time and peak memory
    preprocess      fused_preprocess on a batch of 32 photo-sized uint8 images on the GPU: images/s

Each writes its result as JSON; an exception fails the step (its traceback is in the step's log).
The functions take a device and sizes so that their code paths can be exercised on a CPU too.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _image(w: int = 96, h: int = 64):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype("uint8"))


def chat(device: str = "cuda") -> dict:
    import torch

    from eagle_fast.inference import ChatSession, load_model

    _tf32(False)  # fp32 on tensor cores (TF32) would not match the CPU
    torch.manual_seed(0)
    model, tok, proc = load_model("eagle-tiny-x5", dtype="float32", device="cpu")
    # stop=() and no stop ids: every turn generates its full length, so the comparison covers it all
    gen = dict(do_sample=False, temperature=0.0, max_new_tokens=24, stop=(), stop_ids=())

    def converse() -> list[str]:
        conv = ChatSession(model, tok, proc, **gen)
        return [conv.send("What shape is in the image?", images=[_image()]), conv.send("And its colour?")]

    cpu = converse()
    model.to(device)
    gpu = converse()
    if cpu != gpu:
        raise AssertionError(f"greedy replies differ:\n CPU {cpu!r}\n GPU {gpu!r}")
    return {"turns": 2, "new_tokens_per_turn": 24, "replies": gpu, "equal": True}


def _to(obj, device):
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj.to(device) if hasattr(obj, "to") else obj


def sft7b(preset: str = "eagle-x5-7b", device: str = "cuda", batch_size: int = 4) -> dict:
    import torch
    from transformers import AutoTokenizer

    from eagle_fast.data import EagleCollator, EagleDataset
    from eagle_fast.data.easy_vqa import easy_vqa_dataset
    from eagle_fast.model import EagleLlamaForCausalLM, presets
    from eagle_fast.train.builders import builtin_tokenizer_dir
    from eagle_fast.vision.processor import EagleImageProcessor

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir("assets"))  # Vicuna's 32000-token vocabulary
    tok.pad_token = tok.pad_token or tok.unk_token
    cfg = presets.get(preset, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    t0 = time.time()
    # built on the GPU in bf16: random init of ~9 B parameters on the CPU in fp32 takes minutes
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = EagleLlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    build_s = time.time() - t0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    data = easy_vqa_dataset("easy_vqa")
    ds = EagleDataset(
        data.sft,
        data.image_folder,
        tok,
        EagleImageProcessor.from_model_config(cfg),
        "vicuna_v1",
        2048,
        image_tokens=cfg.mm_grid**2,
        seed=0,
    )
    batch = EagleCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(batch_size)])
    batch = _to(
        {
            k: batch[k]
            for k in ("input_ids", "attention_mask", "labels", "images", "packed_seq_lens")
            if batch.get(k) is not None
        },
        device,
    )
    mask = batch["attention_mask"].bool()
    images = int(((batch["input_ids"] == -200) & mask).sum())
    tokens = int(mask.sum()) - images + images * cfg.mm_grid**2  # rows once each image is spliced in

    def micro_step() -> float:
        out = model(**batch)
        out.loss.backward()
        return out.loss.detach().item()

    cuda = device.startswith("cuda")
    micro_step()  # compiles the Triton kernels
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    repeats = 2
    for _ in range(repeats):
        loss = micro_step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.time() - t0) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {
        "preset": preset,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "batch": batch_size,
        "tokens": tokens,
        "loss": round(loss, 4),
        "micro_step_s": round(dt, 3),
        "tokens_per_s": round(tokens / dt, 1),
        "peak_memory_gib": peak and round(peak, 2),
        "build_s": round(build_s, 1),
        "note": "forward + backward (gradients accumulate over the repeats); no optimizer step",
    }


def attention(device: str = "cuda", shapes=((8, 2048), (2, 8192)), width: int | None = None) -> dict:
    from eagle_fast.bench.attention import AttentionBenchConfig, run

    rows = []
    for d, causal in ((64, False), (128, True)):
        rows += run(
            AttentionBenchConfig(
                device=device, dtype="bfloat16", head_dims=(d,), causal=(causal,), shapes=shapes, width=width, repeats=5
            )
        )
    sdpa = {(r.shape, r.extra["mode"]): r.items_per_s for r in rows if r.provider == "sdpa"}
    return {
        "rows": [
            {
                "shape": r.shape,
                "mode": r.extra["mode"],
                "provider": r.provider,
                "ms": round(r.median_ms, 4),
                "tflops": round(r.items_per_s, 2),
                "vs_sdpa": round(r.items_per_s / sdpa[(r.shape, r.extra["mode"])], 3),
            }
            for r in rows
        ]
    }


def lce(V: int = 128256, H: int = 4096, N: int = 8192, device: str = "cuda") -> dict:
    """Defaults: Llama-3's vocabulary and width, 8k positions."""
    import torch

    from eagle_fast.bench.harness import time_ms
    from eagle_fast.bench.linear_cross_entropy import PROVIDERS, loss_fn, make_problem

    cuda = device.startswith("cuda")
    hidden, weight, labels = make_problem(V, H, N, 1.0, torch.bfloat16, device)  # every row learned
    out = {
        "shape": f"V{V} H{H} N{N}",
        "dtype": "bfloat16",
        "learned_rows": int((labels != -100).sum()),
        "fp32_logits_gib": round(N * V * 4 / 2**30, 2),
    }
    for provider in PROVIDERS:
        fn = loss_fn(provider)

        def step(fn=fn):
            torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight))

        step()
        peak = None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        out[provider] = {"fwd_bwd_ms": round(time_ms(step, repeats=5, cuda=cuda), 3), "peak_extra_gib": peak}
    return out


def preprocess(device: str = "cuda", n: int = 32) -> dict:
    import torch

    from eagle_fast.bench.harness import time_ms
    from eagle_fast.ops import fused_preprocess

    sizes = [(480, 640), (768, 1024), (1080, 1920), (333, 500), (1024, 1024), (427, 640), (2000, 1500), (64, 64)]
    g = torch.Generator().manual_seed(0)
    batch = [
        torch.randint(0, 256, (*sizes[i % len(sizes)], 3), dtype=torch.uint8, generator=g).to(device) for i in range(n)
    ]
    out = {"batch": len(batch), "sizes": sorted(set(sizes))}
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("auto", "triton"):
            ms = time_ms(
                lambda d=dtype, b=backend: fused_preprocess(batch, dtype=d, backend=b),
                repeats=7,
                warmup=2,
                cuda=device.startswith("cuda"),
                min_sample_ms=100,
            )
            out[f"{backend} {str(dtype).removeprefix('torch.')}"] = {
                "ms": round(ms, 3),
                "images_per_s": round(len(batch) / ms * 1e3, 1),
            }
    return out


CHECKS = {"chat": chat, "sft7b": sft7b, "attention": attention, "lce": lce, "preprocess": preprocess}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in CHECKS:
        print(f"usage: checks.py {{{','.join(CHECKS)}}} RESULT.json", file=sys.stderr)
        return 2
    result = CHECKS[argv[0]]()
    with open(argv[1], "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps(result, default=str)[:2000])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
