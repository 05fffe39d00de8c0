"""The GPU check's steps, driver side: each launches the project's own entry points (pytest, the
trainer, the server, eval) or checks.py in a subprocess and judges what comes back. Standard
library only, like the driver: a step that crashes a CUDA context takes down its subprocess, not
the check.
"""

from __future__ import annotations

import base64
import glob
import http.client
import json
import math
import os
import re
import socket
import struct
import subprocess
import time
import urllib.request
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from setup_env import StepFailed, run_logged

HERE = os.path.dirname(os.path.abspath(__file__))
# bf16 keeps 8 significant bits (2^-8 ~ 3.9e-3 relative per rounding); the loss is a mean over
# thousands of tokens computed in fp32 from bf16 activations, so its error stays within a few of those
BF16_RTOL = 1e-2


@dataclass
class Context:
    py: str  # the interpreter under test; every subprocess runs it
    repo: str
    work: str  # scratch: runs, logs, eval output
    env: dict  # the subprocesses' environment (PYTHONPATH holds the private package folder)
    device: str = "cuda"  # where the GPU steps run (another value only to exercise them elsewhere)
    info: dict = field(default_factory=dict)  # what the build probe found
    results: dict = field(default_factory=dict)  # step name -> its detail, for steps that build on others
    background: dict[str, Future] = field(default_factory=dict)  # runs started early, awaited by a step

    def log(self, name: str) -> str:
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        return os.path.join(self.work, "logs", f"{name}.log")


# ------------------------------------------------------------------ cuda tests


def cuda_test_files(tests: str) -> list[str]:
    """Test files that carry the cuda marker. Passing only these keeps pytest from importing the
    other modules, whose dependencies (timm, playwright, deepspeed, ...) the check does not ship."""
    out = []
    for path in sorted(glob.glob(os.path.join(tests, "**", "test_*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            if "mark.cuda" in f.read():
                out.append(path)
    return out


def pytest_counts(text: str) -> dict[str, int]:
    """{"passed": 12, "skipped": 1, ...} from pytest's closing line."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", text)}


def cuda_tests(ctx: Context, timeout: float) -> dict:
    files = cuda_test_files(os.path.join(ctx.repo, "python_tests"))
    if not files:
        raise StepFailed("no cuda-marked test found under python_tests")
    out = run_logged(
        [ctx.py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files],
        ctx.log("cuda-tests"),
        timeout,
        env=ctx.env,
        cwd=ctx.repo,
    )
    counts = pytest_counts(out.strip().splitlines()[-1] if out.strip() else "")
    if not counts.get("passed"):
        raise StepFailed(f"no cuda test passed:\n{out}")
    return {"files": [os.path.relpath(f, ctx.repo) for f in files], **counts}


# ------------------------------------------------------------------ training


def train_run(
    ctx: Context, name: str, preset: str, device: str, steps: int, bf16: bool, timeout: float, batch: int = 4
) -> dict:
    """`python -m eagle_fast.train` on the tiny-x5 recipe's built-in data with `preset` as the
    model; returns the per-step losses of its metrics.jsonl and its throughput."""
    out_dir = os.path.join(ctx.work, name)
    grids = ctx.info.get("grids", {"eagle-tiny-x5": 4, "eagle-small-x5": 32})
    # the recipe's text budget on top of the preset's extra image rows, so samples fit whole
    max_len = 256 + grids.get(preset, 4) ** 2 - grids["eagle-tiny-x5"] ** 2
    cmd = [
        ctx.py,
        "-m",
        "eagle_fast.train",
        "--recipe",
        "tiny-x5",
        "--stage",
        "sft",
        "--output_dir",
        out_dir,
        "--max_steps",
        str(steps),
        "--save_steps",
        "0",
        "--per_device_train_batch_size",
        str(batch),
        "--model_max_length",
        str(max_len),
        "--bf16",
        "true" if bf16 else "false",
        "--device",
        device,
        "--seed",
        "0",
        "--set",
        f"preset={preset}",
    ]
    packing = bool(ctx.info.get("has_packing"))
    if packing:
        cmd += ["--set", "packing=true"]
    env = dict(ctx.env)
    if device == "cpu":  # half the cores: the GPU steps running meanwhile need the others
        env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 2) // 2, 1)))
    run_logged(cmd, ctx.log(name), timeout, env=env, cwd=ctx.work)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in rows]
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        raise StepFailed(f"{name}: expected {steps} finite step losses, got {losses}")
    # steady state: from the end of step 1 (which compiles kernels) to the end of the run
    elapsed = (rows[-1].get("elapsed_s") or 0.0) - (rows[0].get("elapsed_s") or 0.0)
    tokens = sum(r.get("tokens", 0) for r in rows[1:])
    return {
        "preset": preset,
        "device": device,
        "bf16": bf16,
        "batch": batch,
        "model_max_length": max_len,
        "packing": packing if ctx.info.get("has_packing") is not None else "unknown",
        "packing_note": None if packing else "TrainConfig has no `packing` field here: padded batches",
        "losses": [round(x, 5) for x in losses],
        "step1_s": rows[0].get("elapsed_s"),
        "tokens_per_s_after_step1": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "final": os.path.join(out_dir, "final"),
    }


def train_gpu(ctx: Context, timeout: float) -> dict:
    r = train_run(ctx, "train-gpu", "eagle-small-x5", ctx.device, 20, True, timeout)
    first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
    if not last < first:
        raise StepFailed(f"loss did not fall: mean of steps 1-5 {first:.4f}, of steps 16-20 {last:.4f}")
    return r


def start_cpu_step1(ctx: Context, timeout: float) -> None:
    """Starts the fp32 CPU reference of train-gpu's step 1 in the background: it needs no GPU, so it
    runs while the cuda tests and the GPU training do."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="train-cpu")
    ctx.background["train-cpu"] = pool.submit(train_run, ctx, "train-cpu", "eagle-small-x5", "cpu", 1, False, timeout)
    pool.shutdown(wait=False)


def train_step1_vs_cpu(ctx: Context, timeout: float) -> dict:
    gpu = ctx.results.get("train-gpu")
    if not gpu:
        raise StepFailed("not run: train-gpu did not pass")
    job = ctx.background.get("train-cpu")
    cpu = job.result(timeout) if job else train_run(ctx, "train-cpu", "eagle-small-x5", "cpu", 1, False, timeout)
    a, b = gpu["losses"][0], cpu["losses"][0]
    rel = abs(a - b) / abs(b)
    detail = {"gpu_bf16_step1": a, "cpu_fp32_step1": b, "rel_diff": round(rel, 6), "rtol": BF16_RTOL}
    if rel > BF16_RTOL:
        raise StepFailed(f"step-1 loss: GPU bf16 {a} vs CPU fp32 {b} (relative {rel:.3g} > {BF16_RTOL})")
    return detail


def cpu_smoke(ctx: Context, timeout: float) -> dict:
    """Two CPU steps of the tier-1 training path on eagle-tiny-x5 (proves the code path anywhere)."""
    return train_run(ctx, "cpu-smoke", "eagle-tiny-x5", "cpu", 2, False, timeout)


# ------------------------------------------------------------------ checks.py bodies


def checks(ctx: Context, name: str, timeout: float, *args: str) -> dict:
    result = os.path.join(ctx.work, f"{name}.json")
    run_logged(
        [ctx.py, os.path.join(HERE, "checks.py"), name, result, *args],
        ctx.log(name),
        timeout,
        env=ctx.env,
        cwd=ctx.work,
    )
    with open(result) as f:
        return json.load(f)


def chat(ctx: Context, timeout: float) -> dict:
    return checks(ctx, "chat", timeout)


# ------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(w: int = 48, h: int = 32) -> str:
    """A small RGB gradient as a PNG data URL, encoded with the standard library alone."""
    raw = b"".join(b"\x00" + bytes(v for x in range(w) for v in (x * 5 % 256, y * 7 % 256, 128)) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


def serve_stream(ctx: Context, timeout: float) -> dict:
    """`python -m eagle_fast.serve` on the GPU, one streamed chat completion with an image."""
    port, model = free_port(), "eagle-tiny-x5"
    log = ctx.log("serve-stream")
    deadline = time.time() + timeout
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [
                ctx.py,
                "-m",
                "eagle_fast.serve",
                "--model",
                model,
                "--port",
                str(port),
                "--device",
                ctx.device,
                "--log_level",
                "warning",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=ctx.env,
            cwd=ctx.work,
        )
        try:
            t0 = time.time()
            while True:
                if proc.poll() is not None:
                    raise StepFailed(f"server exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise StepFailed("server did not answer /health in time")
                time.sleep(0.5)
            startup = time.time() - t0
            return {"startup_s": round(startup, 2), **_stream_request(port, model, max(deadline - time.time(), 10))}
        except StepFailed as e:
            raise StepFailed(f"{e}\n{_tail(log)}") from None
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-30:])


def _stream_request(port: int, model: str, timeout: float) -> dict:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url()}},
                    {"type": "text", "text": "What shape is in the image?"},
                ],
            }
        ],
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.time()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise StepFailed(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    if not resp.getheader("Content-Type", "").startswith("text/event-stream"):
        raise StepFailed(f"not an event stream: {resp.getheader('Content-Type')}")
    chunks, done, first = [], False, None
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        first = first if first is not None else time.time() - t0
        chunks.append(json.loads(payload))
    conn.close()
    text = "".join((c.get("choices") or [{}])[0].get("delta", {}).get("content") or "" for c in chunks)
    if not done or not chunks:
        raise StepFailed(f"stream ended without [DONE] or chunks ({len(chunks)} chunks)")
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    if not any(finish):
        raise StepFailed("no chunk carried a finish_reason")
    return {
        "chunks": len(chunks),
        "first_chunk_s": round(first, 3),
        "total_s": round(time.time() - t0, 3),
        "text_chars": len(text),
        "finish_reason": [f for f in finish if f][-1],
    }


# ------------------------------------------------------------------ eval


def eval_easy_vqa(ctx: Context, timeout: float) -> dict:
    """`python -m eagle_fast.eval --task easy-vqa --limit 64` with the model train-gpu wrote (a
    random eagle-tiny-x5 if it did not): the pipeline runs end to end; the score is only recorded."""
    trained = ctx.results.get("train-gpu", {}).get("final")
    model = trained if trained and os.path.isdir(trained) else "eagle-tiny-x5"
    out = os.path.join(ctx.work, "eval")
    run_logged(
        [
            ctx.py,
            "-m",
            "eagle_fast.eval",
            "--model",
            model,
            "--task",
            "easy-vqa",
            "--limit",
            "64",
            "--out",
            out,
            "--device",
            ctx.device,
            "--overwrite",
        ],
        ctx.log("eval-easy-vqa"),
        timeout,
        env=ctx.env,
        cwd=ctx.work,
    )
    with open(os.path.join(out, "easy-vqa.results.json")) as f:
        result = json.load(f)
    if result.get("n") != 64 or result.get("errors"):
        raise StepFailed(f"expected 64 answered questions without errors: {result}")
    return {
        "model": "train-gpu final" if model == trained else model,
        "n": result["n"],
        "score": result.get("score"),
        "elapsed_s": result.get("elapsed_s"),
    }
