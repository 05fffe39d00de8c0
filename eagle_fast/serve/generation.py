"""The model behind the server: requests are prepared (images decoded, prompt tokenized, limits
checked) and then generate.

scheduler "batch" (default): every request is submitted to one BatchEngine whose step loop runs
in a background thread (continuous batching: each step advances every running request; see
inference/batch_engine.py). Tokens come back to the event loop through a per-request queue; a
client that has gone is noticed between two tokens and its request cancelled (freed at the next
step). A full waiting queue is refused with 429 before the response starts.

scheduler "sequential": generations run in worker threads, `parallel` at a time, the rest waiting
in FIFO order, one token per worker-thread call (the comparison path).

Counters (`stats()`) show what is running; `metrics()` renders them for Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from eagle_fast.constants import IMAGE_TOKEN_INDEX
from eagle_fast.data.templates import Template, get_template
from eagle_fast.images import to_rgb_batch
from eagle_fast.inference.batch_engine import BatchEngine
from eagle_fast.inference.engine import Engine, GenerationConfig
from eagle_fast.inference.scheduler import EngineConfig, QueueFull
from eagle_fast.inference.session import prompt_ids, safe_text_length
from eagle_fast.serve.config import ServeConfig
from eagle_fast.serve.errors import APIError
from eagle_fast.serve.images import load_image_url
from eagle_fast.serve.request import ChatRequest


def with_system(template: Template, turns: list[tuple[str, str]], system: str | None):
    """The template and turns carrying a client's system prompt, where the template has one."""
    if system is None:
        return template, turns
    if template.style == "two":
        return dataclasses.replace(template, system=system), turns
    if template.style == "mpt":  # the field is a role header ending in a newline, then the prompt
        header = template.system[: template.system.rfind("\n") + 1]
        return dataclasses.replace(template, system=header + system), turns
    if template.style == "hf":  # the tokenizer's chat template renders system turns itself
        return template, [("system", system)] + turns
    return template, turns  # "plain" has no system prompt


@dataclass
class Job:
    """One prepared request and, once it runs, its output so far."""

    input_ids: list[int]
    images: dict[str, Any] | None
    gen: GenerationConfig
    prompt_tokens: int  # rows the model sees: text tokens + mm_grid**2 per image
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    finish_reason: str | None = None  # "stop" / "length" once finished; None if cut short
    seq: Any = None  # the batch engine's request, once admitted
    events: Any = None  # its asyncio queue of engine events
    settled: bool = False  # its outcome counted (completed / cancelled / failed)

    def step(self, tokenizer, stream: Iterator[int]) -> str | None:
        """Advances one token (in a worker thread): the new text it completes, or None at the end."""
        token = next(stream, None)
        if token is None:
            return None
        return self.add(tokenizer, token)

    def add(self, tokenizer, token: int) -> str:
        """Takes one new token: the text it completes (possibly "")."""
        self.tokens.append(token)
        decoded = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = safe_text_length(decoded, self.gen.stop)
        if cut <= len(self.text):
            return ""
        delta, self.text = decoded[len(self.text) : cut], decoded[:cut]
        return delta

    def finish(self, tokenizer) -> str:
        """The rest of the reply once the tokens are done (held-back text that was no stop string)."""
        decoded = tokenizer.decode(self.tokens, skip_special_tokens=True)
        stopped = False
        for s in self.gen.stop:  # a reply ends before its stop string
            if s in decoded:
                decoded, stopped = decoded[: decoded.index(s)], True
        full = not stopped and len(self.tokens) >= self.gen.max_new_tokens
        self.finish_reason = "length" if full else "stop"
        delta = decoded[len(self.text) :] if len(decoded) > len(self.text) else ""
        self.text += delta
        return delta


class Generator:
    def __init__(self, model, tokenizer, processor, config: ServeConfig):
        self.model, self.tokenizer, self.processor, self.config = model, tokenizer, processor, config
        self.template = get_template(config.template)
        self.context = config.context_length or int(model.config.max_position_embeddings)
        self.image_rows = int(getattr(model.config, "mm_grid", 0)) ** 2
        self._slots = anyio.Semaphore(config.parallel)
        # decoding and preprocessing run outside the slots but not unboundedly many at once
        self._prepare = anyio.CapacityLimiter(config.parallel + 1 if config.scheduler == "sequential" else 4)
        self.counts = {"active_generations": 0, "queued": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self.engine: BatchEngine | None = None
        if config.scheduler == "batch":
            seqs = config.max_num_seqs
            if config.parallel != 1:
                seqs = config.parallel
                logging.getLogger("eagle_fast.serve").warning(
                    "--parallel %d: under the batch scheduler this is --max_num_seqs %d", seqs, seqs
                )
            self.engine = BatchEngine(
                model,
                tokenizer,
                EngineConfig(
                    max_num_seqs=seqs,
                    max_batched_tokens=config.max_batched_tokens,
                    kv_cache_bytes=config.kv_cache_bytes,
                    encoder_cache_bytes=config.encoder_cache_bytes,
                    max_queue=config.max_queue,
                ),
                self.context,
            ).start()
        self._scraped = (time.perf_counter(), 0)

    def stats(self) -> dict[str, int]:
        return dict(self.counts, parallel=self.config.parallel)

    def metrics(self) -> str:
        """Prometheus text: requests running / waiting, tokens, tokens/s since the last scrape,
        cache hit rates, TTFT and inter-token histograms."""
        lines = []

        def gauge(name: str, help: str, value, kind: str = "gauge") -> None:
            lines.extend(
                [f"# HELP eagle_fast_{name} {help}", f"# TYPE eagle_fast_{name} {kind}", f"eagle_fast_{name} {value}"]
            )

        c = self.counts
        for k, h in (
            ("completed", "requests finished"),
            ("cancelled", "requests cut short by their client"),
            ("failed", "requests that failed"),
        ):
            gauge(f"requests_{k}_total", h, c[k], "counter")
        if self.engine is None:
            gauge("num_requests_running", "requests generating", c["active_generations"])
            gauge("num_requests_waiting", "requests waiting for a slot", c["queued"])
            return "\n".join(lines) + "\n"
        st = self.engine.stats()
        now, tokens = time.perf_counter(), st["generated_tokens"]
        then, before = self._scraped
        self._scraped = (now, tokens)
        gauge("num_requests_running", "requests in the running batch", st["running"])
        gauge("num_requests_waiting", "requests waiting (queue, experts)", st["waiting"])
        gauge("generation_tokens_total", "tokens generated", tokens, "counter")
        gauge(
            "generation_tokens_per_second",
            "tokens generated per second since the previous scrape",
            round((tokens - before) / max(now - then, 1e-9), 3),
        )
        gauge(
            "encoder_cache_hit_rate",
            "image feature requests served from the encoder cache",
            round(st["encoder_cache_hit_rate"], 6),
        )
        gauge("encoder_runs_total", "images run through the experts", st["encoder_runs"], "counter")
        gauge(
            "prefix_cache_hit_rate",
            "KV blocks found in the prefix cache / blocks looked up",
            round(st["prefix_cache_hit_rate"], 6),
        )
        gauge(
            "kv_cache_usage",
            "fraction of the KV blocks held by requests",
            round(1 - st["kv_blocks_free"] / st["kv_blocks"], 6),
        )
        gauge("num_preemptions_total", "requests preempted for KV space (recomputed)", st["preemptions"], "counter")
        lines += self.engine.ttft.render("eagle_fast_time_to_first_token_seconds", "time to first token")
        lines += self.engine.itl.render("eagle_fast_inter_token_latency_seconds", "time between two tokens")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def _build(self, req: ChatRequest) -> Job:
        cfg = self.config
        images = [load_image_url(url, param, cfg) for url, param in req.image_urls]
        try:
            pixels = (
                self.processor(to_rgb_batch(images, cfg.max_image_pixels), device=self.model.device) if images else None
            )  # preprocessed where the model runs (CUDA: uint8 upload)
        except ValueError as exc:  # the processor names the image and the problem
            raise APIError(400, f"image cannot be used: {exc}", param="messages", code="invalid_image") from None
        template, turns = with_system(self.template, req.turns, req.system)
        ids = prompt_ids(template, turns, self.tokenizer)
        n_images = ids.count(IMAGE_TOKEN_INDEX)
        prompt_tokens = len(ids) - n_images + n_images * self.image_rows
        room = self.context - prompt_tokens
        if room < 1 or (req.max_tokens or 1) > room:
            wanted = f" + max_tokens {req.max_tokens}" if req.max_tokens else ""
            raise APIError(
                400,
                f"the prompt takes {prompt_tokens} tokens (each image {self.image_rows}){wanted}, "
                f"beyond the model's context of {self.context}; shorten the conversation, "
                f"send fewer images or lower max_tokens",
                param="max_tokens" if room >= 1 else "messages",
                code="context_length_exceeded",
            )
        stop = tuple(dict.fromkeys(s for s in (template.stop, *req.stop) if s))
        gen = GenerationConfig(
            max_new_tokens=req.max_tokens or min(cfg.max_tokens, room),
            temperature=cfg.temperature if req.temperature is None else float(req.temperature),
            top_p=cfg.top_p if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
            stop=stop,
            # unseeded requests still differ from each other: each gets a fresh random seed
            seed=secrets.randbits(63) if req.seed is None else req.seed,
            ignore_eos=req.ignore_eos,
            min_new_tokens=req.min_tokens,
        )
        return Job(ids, pixels, gen, prompt_tokens)

    async def prepare(self, req: ChatRequest) -> Job:
        """Decodes the images and tokenizes the prompt off the event loop; APIError on bad input."""
        return await anyio.to_thread.run_sync(self._build, req, limiter=self._prepare)

    def admit(self, job: Job) -> None:
        """Batch scheduler: submits the job to the engine now (429 when its queue is full, 400 when
        it cannot fit); the sequential scheduler queues in `run`."""
        if self.engine is None:
            return
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event) -> None:  # called in the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        try:
            job.seq = self.engine.submit(job.input_ids, job.images, job.gen, sink)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}", code="queue_full") from None
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) or "KV" in str(exc) else "invalid_value"
            raise APIError(400, str(exc), param="messages", code=code) from None
        job.events = events
        self.counts["active_generations"] += 1

    def abandon(self, job: Job) -> None:
        """An admitted job whose reply never started (its client left before the response's first
        byte, so `run` never ran): cancelled in the engine and counted as cancelled."""
        if self.engine is not None and job.seq is not None and not job.settled:
            job.settled = True
            self.engine.cancel(job.seq)
            self.counts["cancelled"] += 1
            self.counts["active_generations"] -= 1

    async def _run_batch(self, job: Job, is_disconnected) -> AsyncIterator[str]:
        outcome = "cancelled"
        try:
            while not await is_disconnected():
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), 0.25)
                except asyncio.TimeoutError:
                    continue  # no token yet: check the client again
                if kind == "token":
                    delta = job.add(self.tokenizer, value)
                    if delta:
                        yield delta
                    continue
                if kind == "error":
                    raise value
                tail = job.finish(self.tokenizer)
                outcome = "completed"
                if tail:
                    yield tail
                return
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            job.settled = True
            if outcome != "completed":
                self.engine.cancel(job.seq)
            self.counts[outcome] += 1
            self.counts["active_generations"] -= 1

    async def run(self, job: Job, is_disconnected) -> AsyncIterator[str]:
        """Text deltas of the reply. Waits for a slot; stops (closing the generation and freeing the
        slot) as soon as `await is_disconnected()` is true between two tokens. Close it with
        contextlib.aclosing so that a consumer that stops early frees the slot at once too."""
        if self.engine is not None:
            if job.seq is None:
                self.admit(job)
            async with contextlib.aclosing(self._run_batch(job, is_disconnected)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        self.counts["queued"] += 1
        try:
            await self._slots.acquire()
        finally:
            self.counts["queued"] -= 1
        self.counts["active_generations"] += 1
        # an Engine per request: its sampling generator is per-request state
        tokens = Engine(self.model, self.tokenizer, self.context).stream(job.input_ids, job.images, job.gen)
        outcome = "cancelled"
        try:
            while not await is_disconnected():
                try:
                    delta = await anyio.to_thread.run_sync(job.step, self.tokenizer, tokens)
                except ValueError as exc:  # the engine refuses the request (its context check)
                    code = "context_length_exceeded" if "context" in str(exc) else "invalid_value"
                    raise APIError(400, str(exc), param="messages", code=code) from None
                if delta is None:
                    tail = job.finish(self.tokenizer)
                    outcome = "completed"
                    if tail:
                        yield tail
                    return
                if delta:
                    yield delta
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            raise  # the client went away or the consumer stopped: counted as cancelled
        except BaseException:
            outcome = "failed"
            raise
        finally:
            tokens.close()  # stops the engine where it is; never runs while a step is in a thread
            self.counts[outcome] += 1
            self.counts["active_generations"] -= 1
            self._slots.release()
