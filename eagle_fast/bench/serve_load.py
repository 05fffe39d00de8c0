"""The load side of `python -m eagle_fast.bench serve`: synthetic request images, streaming HTTP
clients that time each server-sent event, and the server under test as a subprocess."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eagle_fast.bench.serve import ServeBenchConfig


def synthetic_image(k: int, size: int):
    """Request k's image: a background colour unique to k (for k < 2**24), a shape (rectangle, ellipse
    or triangle) in the complementary colour, placed and sized by k."""
    from PIL import Image, ImageDraw

    v = (k * 0x9E3779) % (1 << 24)  # an odd multiplier permutes 24-bit values: distinct, well spread
    bg = (v >> 16, (v >> 8) & 255, v & 255)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    fg = tuple(255 - c for c in bg)
    s = size // 4 + (k * 7) % (size // 4)
    x, y = (k * 31) % (size - s), (k * 17) % (size - s)
    box = (x, y, x + s, y + s)
    if k % 3 == 0:
        draw.rectangle(box, fill=fg)
    elif k % 3 == 1:
        draw.ellipse(box, fill=fg)
    else:
        draw.polygon([(x, y + s), (x + s // 2, y), (x + s, y + s)], fill=fg)
    return img


def data_url(img) -> str:
    import base64

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------- client


@dataclass
class Reply:
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks carrying text
    tokens: int = 0  # usage.completion_tokens
    ended: float = 0.0
    error: str | None = None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def chat_body(cfg: ServeBenchConfig, url: str, max_tokens: int) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": cfg.prompt}]
    return json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,  # every reply max_tokens long (vLLM's extension, as its benchmarks send)
        }
    ).encode()


def stream_chat(port: int, body: bytes, timeout: float) -> Reply:
    """One streamed chat completion over http.client, timing each server-sent event as it arrives."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    reply = Reply(sent=time.perf_counter())
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            reply.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return reply
        while line := resp.readline():
            now = time.perf_counter()
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                reply.error = f"stream error: {event['error']}"
                break
            if event.get("usage"):
                reply.tokens = int(event["usage"]["completion_tokens"])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                reply.chunks.append(now)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    finally:
        reply.ended = time.perf_counter()
        conn.close()
    return reply


def run_level(port: int, bodies: list[list[bytes]], timeout: float) -> tuple[list[Reply], float]:
    """Clients in threads, client i sending bodies[i] one after another (released together);
    -> every reply, wall seconds from the release to the last reply's end."""
    replies: list[list[Reply]] = [[] for _ in bodies]
    gate = threading.Barrier(len(bodies) + 1)

    def client(i: int) -> None:
        gate.wait()
        for body in bodies[i]:
            replies[i].append(stream_chat(port, body, timeout))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return [r for rs in replies for r in rs], time.perf_counter() - t0


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m eagle_fast.serve` in a subprocess, from start to /health answering, until closed."""

    def __init__(self, cfg: ServeBenchConfig, scheduler: str, max_queue: int):
        self.port, self.scheduler = free_port(), scheduler
        seqs = cfg.max_num_seqs or max(cfg.concurrency)
        cmd = [
            sys.executable,
            "-m",
            "eagle_fast.serve",
            "--model",
            cfg.model,
            "--port",
            str(self.port),
            "--scheduler",
            scheduler,
            "--template",
            cfg.template,
            "--temperature",
            "0",
            "--max_tokens",
            str(cfg.max_tokens),
            "--device",
            cfg.device,
            "--dtype",
            cfg.dtype,
            "--log_level",
            "warning",
            "--max_queue",
            str(max_queue),
            "--max_num_seqs",
            str(seqs),
            "--max_batched_tokens",
            str(cfg.max_batched_tokens),
            "--encoder_cache_bytes",
            str(cfg.encoder_cache_bytes),
        ]
        if cfg.kv_cache_bytes is not None:
            cmd += ["--kv_cache_bytes", str(cfg.kv_cache_bytes)]
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
        env.pop("EAGLE_FAST_API_KEY", None)  # the clients send no key
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(cfg.startup_timeout_s)

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(
                    f"the {self.scheduler} server exited with {self.proc.returncode} before "
                    f"answering /health:\n{self.log_tail()}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.close()
        raise RuntimeError(f"the {self.scheduler} server did not answer /health within {timeout:.0f} s:\n{tail}")

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics (name -> value); {} when it cannot be read."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if line and not line.startswith("#") and "{" not in name:
                out[name] = float(value)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
