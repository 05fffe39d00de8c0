"""Benchmark of the server under load: streaming HTTP clients against `python -m eagle_fast.serve`,
the continuous-batching engine (`--scheduler batch`) and the one-request-at-a-time path
(`--scheduler sequential`, one slot) in one run.

Each scheduler gets a server of its own, a subprocess on a free loopback port; both are started
(one after the other) and warmed up before the first level, and each level is run on one server
and then on the other, never both at once (an idle server takes no CPU), in the order A B, B A,
A B, ...: a drift of the machine's speed over the run then hits both schedulers alike. Each
request carries one synthetic image of its own (background colour, shape and position drawn from
the request's number), so the encoder and prefix caches find nothing to reuse across requests;
`--same_image` sends one image with every request instead, to measure what their de-duplication
gives. Replies are greedy and `max_tokens` long (`ignore_eos`, vLLM's extension: EOS does not end
them); every figure still uses the replies' actual lengths (`usage.completion_tokens`).

Load patterns, at each level c of `--concurrency`:
  burst    c requests sent at the same instant (one per client), the level timed until the last ends
  closed   c clients, each sending its next request when its previous reply has ended,
           `--requests_per_client` times (a closed loop)

Reported per (scheduler, pattern, c): aggregate output tokens/s (all replies' tokens / wall time
from the first request sent to the last reply ended), TTFT p50/p99 (request sent -> first chunk
with text), inter-token latency p50/p99 (gaps between consecutive text chunks of a stream; a token
whose text is held back, e.g. half a UTF-8 character, rides on the next chunk, so a gap can span
two tokens; `itl_mean_ms` in the CSV is (last chunk - first chunk) / (tokens - 1) per request).

The compute-bound ideal (`ideal tokens/s`), measured in-process with the same model, prompt and
image size before any server starts (no HTTP, no event loop):
  prefill_s   one request alone on a BatchEngine: image preprocessing, experts and LLM prefill to
              its first token (median of `prefill_repeats`, after a warm-up; `--same_image`: the
              image already in the encoder cache and the prompt in the prefix cache)
  step_s(c)   one engine step with c sequences all decoding, each with an image of its own (so c
              prompts' K/V are read, as in the load runs; `--same_image`: one image, shared
              blocks), the mean of `decode_steps` steps right after their prefill: the KV length
              is the prompt's, a slight underestimate of the mean step over a reply)
  ideal tokens/s = c * N / (c * prefill_s + N * step_s(c))
with N the mean reply length: c prefills one after another, then N decode steps of batch c. For the
closed loop the same formula holds: R rounds of c requests cost R * (c * prefill_s + N * step_s(c))
for R * c * N tokens. The engine overlaps prefill chunks with other requests' decode rows, so the
figure is the serial-compute reference, not a strict bound. The sequential scheduler is compared
against the same figure (its own ideal would be the c = 1 one at every level); as prefill_s is the
BatchEngine's, a sequential server whose Engine prefills faster can exceed it.

`encoder_runs` in the CSV (batch server only: the difference of its /metrics counter over the
level) shows the experts running once per request, or once in all with `--same_image`.

`python -m eagle_fast.bench all` runs this benchmark only with --quick, at pipeline-check settings
(eagle-tiny-x5, c = 1 and 2, 4 tokens, burst): the defaults take long on a CPU (two servers, 1024
image rows per prompt).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from eagle_fast.bench.harness import Row, publish
from eagle_fast.bench.serve_ideal import ideal_tokens_per_s, measure_compute
from eagle_fast.bench.serve_load import Reply, Server, chat_body, data_url, run_level, stream_chat, synthetic_image

PATTERNS = ("burst", "closed")
SCHEDULERS = ("batch", "sequential")


@dataclass
class ServeBenchConfig:
    model: str = field(default="eagle-small-x5", metadata={"help": "preset name or checkpoint directory"})
    concurrency: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "clients at once, one level each"})
    max_tokens: int = field(default=128, metadata={"help": "max_tokens of every request (greedy)"})
    patterns: tuple[str, ...] = field(default=PATTERNS, metadata={"choices": PATTERNS, "help": "load patterns"})
    requests_per_client: int = field(default=2, metadata={"help": "closed loop: requests each client sends"})
    schedulers: tuple[str, ...] = field(
        default=SCHEDULERS, metadata={"choices": SCHEDULERS, "help": "server schedulers, run in turn"}
    )
    same_image: bool = field(default=False, metadata={"help": "one image in every request (cache de-duplication)"})
    image_size: int = field(default=448, metadata={"help": "side of the synthetic square images, pixels"})
    prompt: str = "Describe this image in detail."
    template: str = "vicuna_v1"
    threads: int = field(default=2, metadata={"help": "torch threads (OMP_NUM_THREADS of the servers)"})
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int | None = field(default=None, metadata={"help": "batch server (default: the largest level)"})
    max_batched_tokens: int = 512
    kv_cache_bytes: int | None = None
    encoder_cache_bytes: int = 256 << 20
    ideal: bool = field(default=True, metadata={"help": "measure prefill and decode step in-process"})
    prefill_repeats: int = 2
    decode_steps: int = field(default=8, metadata={"help": "timed decode steps per batch size"})
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 1800.0
    out_dir: str = "bench_results"

    def validate(self) -> "ServeBenchConfig":
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        for name in ("max_tokens", "requests_per_client", "threads", "prefill_repeats", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self


def percentile(values, q: float) -> float:
    """The q-th percentile (linear interpolation between ranks); nan when there are no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


# ---------------------------------------------------------------------------- the run


def level_bodies(cfg: ServeBenchConfig, pattern: str, c: int, counter: list[int]) -> list[list[bytes]]:
    """Each client's request bodies; counter[0] numbers the images (distinct across the whole run)."""
    per_client = 1 if pattern == "burst" else cfg.requests_per_client
    out = []
    for _ in range(c):
        mine = []
        for _ in range(per_client):
            k = 1 if cfg.same_image else counter[0]
            counter[0] += 1
            mine.append(chat_body(cfg, data_url(synthetic_image(k, cfg.image_size)), cfg.max_tokens))
        out.append(mine)
    return out


def summarize(replies: list[Reply], wall_s: float) -> dict:
    ok = [r for r in replies if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.chunks[0] - r.sent for r in ok if r.chunks]
    gaps = [g for r in ok for g in r.gaps()]
    itl_mean = [(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in ok if len(r.chunks) > 1 and r.tokens > 1]
    return {
        "requests": len(replies),
        "errors": len(replies) - len(ok),
        "first_error": next((r.error for r in replies if r.error), None),
        "completion_tokens": tokens,
        "mean_reply_tokens": tokens / len(ok) if ok else 0.0,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "itl_mean_ms": statistics.mean(itl_mean) * 1e3 if itl_mean else math.nan,
    }


def _num(x: float, spec: str, unit: str = "") -> str:
    return "n/a" if math.isnan(x) else f"{x:{spec}}{unit}"


def report(rows: list[Row], compute: dict | None) -> str:
    lines = []
    if compute:
        steps = ", ".join(f"c={c}: {s * 1e3:.1f} ms" for c, s in compute["step_s"].items())
        lines.append(f"in-process: prefill {compute['prefill_s'] * 1e3:.1f} ms; decode step {steps}")
    lines += [
        "| load | scheduler | requests | mean reply tokens | out tokens/s | ideal tokens/s | of ideal | "
        "TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.provider == "ideal":
            continue
        e = r.extra
        lines.append(
            f"| {r.shape} | {r.provider} | {e['requests']} | {e['mean_reply_tokens']:.1f} | "
            f"{r.items_per_s:.2f} | {_num(e['ideal_tokens_per_s'], '.2f')} | "
            f"{_num(e['x_of_ideal'], '.2f', 'x')} | {_num(e['ttft_p50_ms'], '.0f')} / "
            f"{_num(e['ttft_p99_ms'], '.0f')} | {_num(e['itl_p50_ms'], '.1f')} / "
            f"{_num(e['itl_p99_ms'], '.1f')} | {e['errors']} |"
        )
    return "\n".join(lines)


def _run_level(cfg: ServeBenchConfig, server: Server, pattern: str, c: int, counter: list[int]) -> dict:
    before = server.metrics()
    replies, wall = run_level(server.port, level_bodies(cfg, pattern, c, counter), cfg.request_timeout_s)
    s = summarize(replies, wall)
    after = server.metrics()
    runs = "eagle_fast_encoder_runs_total"  # the batch engine's: images run through the experts
    s["encoder_runs"] = after[runs] - before[runs] if runs in after and runs in before else None
    if s["errors"] == s["requests"]:
        raise RuntimeError(
            f"{server.scheduler} server, {pattern} c={c}: every request failed, the first "
            f"with {s['first_error']}\n{server.log_tail()}"
        )
    print(f"{server.scheduler} {pattern} c={c}: {s['tokens_per_s']:.2f} tokens/s, {s['errors']} errors", flush=True)
    return s


def main(cfg: ServeBenchConfig) -> list[Row]:
    cfg.validate()
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
    compute = measure_compute(cfg) if cfg.ideal else None
    levels = [(p, c) for p in cfg.patterns for c in cfg.concurrency]
    most = max(c * (1 if p == "burst" else cfg.requests_per_client) for p, c in levels)
    stats: dict[tuple[str, str, int], dict] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for scheduler in cfg.schedulers:  # started one after the other; an idle server takes no CPU
            server = servers[scheduler] = stack.enter_context(Server(cfg, scheduler, max_queue=max(256, most)))
            warm = stream_chat(
                server.port,
                chat_body(cfg, data_url(synthetic_image(0, cfg.image_size)), min(4, cfg.max_tokens)),
                cfg.request_timeout_s,
            )
            if warm.error:
                raise RuntimeError(f"{scheduler} server, warm-up request: {warm.error}\n{server.log_tail()}")
        counters = {s: [2] for s in cfg.schedulers}  # 0: warm-up, 1: the --same_image image
        for i, (pattern, c) in enumerate(levels):
            # A B, B A, A B, ...: each level's schedulers run back to back, so a drift of the machine's
            # speed over the run (a shared 2-core VM drifted by ~30% within an hour) hits them alike
            for scheduler in cfg.schedulers if i % 2 == 0 else cfg.schedulers[::-1]:
                stats[(scheduler, pattern, c)] = _run_level(cfg, servers[scheduler], pattern, c, counters[scheduler])
    rows = []
    tag = " same-image" if cfg.same_image else ""
    for pattern, c in levels:
        shape = f"{cfg.model} {pattern} c{c} N{cfg.max_tokens}{tag}"
        level = [stats[(s, pattern, c)] for s in cfg.schedulers]
        mean_n = statistics.mean(s["mean_reply_tokens"] for s in level)
        ideal = (
            ideal_tokens_per_s(c, mean_n, compute["prefill_s"], compute["step_s"][c])
            if compute and mean_n > 0
            else math.nan
        )
        for scheduler, s in zip(cfg.schedulers, level):
            own = (
                ideal_tokens_per_s(c, s["mean_reply_tokens"], compute["prefill_s"], compute["step_s"][c])
                if compute and s["mean_reply_tokens"] > 0
                else math.nan
            )
            extra = dict(
                s,
                pattern=pattern,
                concurrency=c,
                same_image=cfg.same_image,
                max_tokens=cfg.max_tokens,
                ideal_tokens_per_s=own,
                x_of_ideal=s["tokens_per_s"] / own if own > 0 else math.nan,
            )
            rows.append(
                Row(
                    "serve",
                    scheduler,
                    device,
                    dtype,
                    cfg.threads,
                    shape,
                    1e3 / s["tokens_per_s"] if s["tokens_per_s"] else math.inf,
                    s["tokens_per_s"],
                    extra,
                )
            )
        if compute:
            extra = dict(
                pattern=pattern,
                concurrency=c,
                mean_reply_tokens=mean_n,
                prefill_s=compute["prefill_s"],
                step_s=compute["step_s"][c],
                formula="c*N/(c*prefill_s+N*step_s(c))",
            )
            rows.append(Row("serve", "ideal", device, dtype, cfg.threads, shape, 1e3 / ideal, ideal, extra))
    publish(
        rows,
        report(rows, compute),
        cfg.out_dir,
        "serve",
        "server output tokens/s",
        machine_note=f", threads={cfg.threads}",
        ylabel="output tokens / s (higher is better)",
        label=lambda r: f"{r.shape.split(' ', 1)[1]}\n{r.provider}",
    )
    return rows
