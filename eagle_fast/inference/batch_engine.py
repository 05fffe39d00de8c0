"""BatchEngine: continuous batching over a paged KV cache, with an encoder cache and shared
prefixes — the generation engine of ChatSession, eval and the server.

    engine = BatchEngine(model, tokenizer)              # driven by its callers...
    for token in engine.stream(ids, images, gen): ...   # ...each call steps the engine when needed
    engine.start()                                      # or by a background thread (the server)

Each iteration runs at most one unit of encoder work (one image's experts, for the oldest request
waiting on them, just in time: when the next step has room to admit it; features go to the encoder
cache under the image's digest) and then one LLM step
(scheduler.py: the running sequences' next tokens plus admitted prefill chunks, one packed
forward in paged_llm.py). Requests join at the next step and leave when finished or cancelled.
Sampling is per request (its own torch.Generator, logits processors, stop ids and strings), as in
`Engine.stream`, so a seeded request gives the same tokens whatever runs beside it.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from eagle_fast.constants import IMAGE_TOKEN_INDEX
from eagle_fast.data.collate import select_images, to_device
from eagle_fast.inference.encoder_cache import EncoderCache
from eagle_fast.inference.engine import GenerationConfig, _processors, _Stopper, image_digests
from eagle_fast.inference.kv_cache import BlockPool
from eagle_fast.inference.metrics import ITL_BUCKETS, TTFT_BUCKETS, Histogram
from eagle_fast.inference.paged_llm import StepBatch, kv_shape, llm_layers, paged_forward
from eagle_fast.inference.scheduler import EngineConfig, QueueFull, Scheduler, Sequence


class BatchEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, context_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = (config or EngineConfig()).validate()
        self.context = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.grid2 = int(getattr(model.config, "mm_grid", 0)) ** 2
        layers, hkv, hd = kv_shape(model)
        dtype = next(model.parameters()).dtype
        bs = self.config.block_size
        per_block = BlockPool.bytes_per_block(layers, bs, hkv, hd, dtype)
        one = math.ceil(self.context / bs) + 1
        wanted = self.config.max_num_seqs * math.ceil(self.context / bs) + 1
        budget = self.config.kv_cache_bytes
        blocks = (
            min(budget // per_block, wanted) if budget is not None else max(min((1 << 30) // per_block, wanted), one)
        )
        self.pool = BlockPool(layers, blocks, bs, hkv, hd, dtype, model.device)
        self.encoders = EncoderCache(self.config.encoder_cache_bytes)
        self.scheduler = Scheduler(self.config, self.pool, self._prepare)
        self._incoming: list[Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time, whoever drives
        self._thread: threading.Thread | None = None
        self._stop = False
        self.generated_tokens = self.steps = 0
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)

    # ------------------------------------------------------------------ requests

    def rows(self, input_ids: list[int]) -> int:
        n_img = input_ids.count(IMAGE_TOKEN_INDEX)
        return len(input_ids) - n_img + n_img * self.grid2

    def submit(
        self, input_ids: list[int], images: dict[str, Any] | None, gen: GenerationConfig | None, sink
    ) -> Sequence:
        """Queues a request; `sink` receives ("token", id) per token, then ("done", None), or
        ("error", exception). ValueError when it cannot fit, QueueFull when the queue is full."""
        gen = gen or GenerationConfig()
        rows = self.rows(input_ids)
        if rows + gen.max_new_tokens > self.context:
            raise ValueError(
                f"prompt of {rows} rows (images included) + max_new_tokens {gen.max_new_tokens} "
                f"exceeds the context of {self.context}; shorten the history or max_new_tokens"
            )
        if rows + gen.max_new_tokens > self.pool.num_blocks * self.pool.block_size:
            raise ValueError(
                f"prompt of {rows} rows + max_new_tokens {gen.max_new_tokens} exceeds the KV cache of "
                f"{self.pool.num_blocks * self.pool.block_size} rows; raise kv_cache_bytes"
            )
        digests = image_digests(images)
        if len(digests) != input_ids.count(IMAGE_TOKEN_INDEX):
            raise ValueError(f"{input_ids.count(IMAGE_TOKEN_INDEX)} image placeholders but {len(digests)} images")
        it = iter(digests)
        keys: list = []
        for t in input_ids:
            if t == IMAGE_TOKEN_INDEX:
                d = next(it)
                keys += [("image", d, r) for r in range(self.grid2)]
            else:
                keys.append(t)
        rng = torch.Generator()
        rng.manual_seed(gen.seed if gen.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        seen = [t for t in input_ids if t >= 0]
        stop_ids = gen.stop_id_set(self.tokenizer)
        seq = Sequence(
            rid=next(self._ids),
            input_ids=list(input_ids),
            images=images,
            digests=digests,
            row_keys=keys,
            prompt_rows=rows,
            gen=gen,
            sink=sink,
            rng=rng,
            procs=_processors(gen, len(seen), stop_ids),
            stopper=_Stopper(self.tokenizer, gen.stop),
            stop_ids=stop_ids,
            seen=seen,
        )
        with self._work:
            if len(self._incoming) + len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting; retry later")
            self._incoming.append(seq)
            self._work.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stops a request at the next step (its blocks are freed there); safe from any thread."""
        with self._work:
            seq.cancelled = True
            self._work.notify()

    def stream(
        self, input_ids: list[int], images: dict[str, Any] | None = None, gen: GenerationConfig | None = None
    ) -> Iterator[int]:
        """Queues the request now and returns an iterator of its new token ids (as Engine.stream;
        closing it early cancels the request). Without a background thread, waiting on the next
        token steps the engine (advancing every request it holds)."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        return self._consume(self.submit(input_ids, images, gen, events.put), events)

    def _consume(self, seq: Sequence, events: queue.SimpleQueue) -> Iterator[int]:
        try:
            while True:
                while self._thread is None and events.empty():
                    if not self.step() and events.empty():
                        raise RuntimeError(f"request {seq.rid} cannot progress (nothing left to schedule)")
                kind, value = events.get()
                if kind == "token":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if not seq.done:
                self.cancel(seq)

    def generate_batch(
        self,
        prompts: list[list[int]],
        images: list[dict[str, Any] | None] | None = None,
        gen: GenerationConfig | None = None,
    ) -> list[list[int]]:
        """Several prompts (each with its processor output or None) -> each one's new token ids."""
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"generate_batch: {len(prompts)} prompts but {len(images)} image entries")
        streams = [self.stream(p, im, gen) for p, im in zip(prompts, images)]
        results: list[list[int]] = [[] for _ in prompts]
        for out, s in zip(results, streams):
            out.extend(s)  # the first consumer steps every request; the rest mostly read queued tokens
        return results

    # ------------------------------------------------------------------ background loop

    def start(self) -> "BatchEngine":
        """Runs the step loop in a daemon thread (idle while there is no work)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="eagle-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._work:
            self._stop = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stop and not self.has_work():
                    self._work.wait()
                if self._stop:
                    return
            self.step()

    def has_work(self) -> bool:
        """Anything submitted and not finished, including requests not yet taken in by a step
        (so `submit(...); while engine.has_work(): engine.step()` runs the request to its end)."""
        return bool(self._incoming or self.scheduler.waiting or self.scheduler.running)

    # ------------------------------------------------------------------ one iteration

    def _finish(self, seq: Sequence, kind: str = "done", value: Any = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.scheduler.remove(seq)
        seq.sink((kind, value))

    def _intake(self) -> None:
        with self._work:
            new, self._incoming = self._incoming, []
        for seq in new:
            self.scheduler.waiting.append(seq)
            for i, d in enumerate(seq.digests):
                feats = self.encoders.request(d, seq.images, i)
                if feats is not None:
                    seq.features[i] = feats
        for seq in [s for s in (*self.scheduler.waiting, *self.scheduler.running) if s.cancelled]:
            self._finish(seq)

    @torch.no_grad()
    def _encode_one(self) -> bool:
        """One image's experts, for the oldest waiting request still missing features, run just in
        time: only when the rows already queued ahead of it (running sequences' decode rows and
        prefill, ready waiting requests' prompts) leave room in the next step. Experts run earlier
        delay the first token of every request before them and gain nothing: in a burst of 16
        image requests on 2 cores, encoding all 16 up front put ~7 extra expert runs (0.7 s each)
        before the 8th request's first token."""
        ahead = sum(s.pending() for s in self.scheduler.running)  # decode rows + prefill left
        for seq in self.scheduler.waiting:
            if ahead >= self.config.max_batched_tokens:
                return False
            missing = [i for i in range(len(seq.digests)) if i not in seq.features]
            if not missing:
                ahead += seq.pending()
                continue
            i, d = missing[0], seq.digests[missing[0]]
            feats = self.encoders.get(d)
            if feats is None:
                images = to_device(select_images(seq.images, [i]), self.model.device)
                feats = self.model.encode_images(images)[0]
                self.encoders.put(d, feats)
            for other in self.scheduler.waiting:  # every request waiting on this image
                for j, dj in enumerate(other.digests):
                    if dj == d and j not in other.features:
                        other.features[j] = feats
            return True
        return False

    @torch.no_grad()
    def _prepare(self, seq: Sequence) -> None:
        """The prompt rows' input embeddings (image features spliced in), once."""
        if seq.embeds is not None:
            return
        ids = torch.tensor([seq.input_ids], device=self.model.device)
        if seq.digests:
            feats = torch.stack([seq.features[i] for i in range(len(seq.digests))])
            seq.embeds = self.model.splice_inputs(ids, None, None, feats).inputs_embeds[0]
        else:
            seq.embeds = llm_layers(self.model)[0](ids)[0]
        seq.images = None  # the pixels are no longer needed

    def _rows_embeds(self, seq: Sequence, a: int, b: int) -> torch.Tensor:
        parts = []
        if a < seq.prompt_rows:
            parts.append(seq.embeds[a : min(b, seq.prompt_rows)])
        if b > seq.prompt_rows:
            ids = torch.tensor(seq.row_keys[max(a, seq.prompt_rows) : b], device=self.model.device)
            parts.append(llm_layers(self.model)[0](ids))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def step(self) -> bool:
        """One iteration (encoder unit + LLM step); False when there was nothing to do."""
        with self._step_lock:
            try:
                self._intake()
                encoded = self._encode_one()
                plan = self.scheduler.schedule()
                if plan:
                    self._run(plan)
                return bool(plan or encoded)
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                    self._finish(seq, "error", exc)
                return True

    @torch.no_grad()
    def _run(self, plan: list[tuple[Sequence, int]]) -> None:
        dev, bs = self.model.device, self.pool.block_size
        embeds, positions, slots, cu, lk = [], [], [], [0], []
        width = max(len(s.blocks) for s, _ in plan)
        table = torch.zeros((len(plan), width), dtype=torch.int32)
        for r, (seq, n) in enumerate(plan):
            a = seq.computed
            embeds.append(self._rows_embeds(seq, a, a + n))
            pos = list(range(a, a + n))
            positions += pos
            slots += [seq.blocks[p // bs] * bs + p % bs for p in pos]
            cu.append(cu[-1] + n)
            lk.append(a + n)
            table[r, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        batch = StepBatch(
            embeds=torch.cat(embeds),
            positions=torch.tensor(positions, device=dev),
            slots=torch.tensor(slots, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seqlens_k=torch.tensor(lk, dtype=torch.int32, device=dev),
            block_table=table.to(dev),
            max_seqlen_q=max(n for _, n in plan),
            last_rows=torch.tensor(cu[1:], device=dev) - 1,
        )
        logits = paged_forward(self.model, batch, self.pool.k, self.pool.v)
        self.steps += 1
        for r, (seq, n) in enumerate(plan):
            seq.computed += n
            self.scheduler.register_blocks(seq)
            if seq.pending() == 0 and not seq.done:
                self._sample(seq, logits[r : r + 1])

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        gen = seq.gen
        scores = seq.procs(torch.tensor([seq.seen], device=logits.device), logits)
        if gen.sampling():
            token = int(torch.multinomial(torch.softmax(scores, -1).cpu(), 1, generator=seq.rng)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        if token in seq.stop_ids:
            self._finish(seq)
            return
        now = time.perf_counter()
        if seq.t_last is None:
            self.ttft.observe(now - seq.t_submit)
        else:
            self.itl.observe(now - seq.t_last)
        seq.t_last = now
        seq.tokens.append(token)
        seq.seen.append(token)
        seq.row_keys.append(token)
        self.generated_tokens += 1
        seq.sink(("token", token))
        if seq.stopper.hit(seq.tokens) or len(seq.tokens) == gen.max_new_tokens:
            self._finish(seq)

    # ------------------------------------------------------------------ observability

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._incoming),
            "generated_tokens": self.generated_tokens,
            "steps": self.steps,
            "preemptions": self.scheduler.preemptions,
            "encoder_runs": self.encoders.encoded,
            "encoder_cache_hit_rate": self.encoders.hit_rate(),
            "prefix_cache_hit_rate": self.pool.hit_rate(),
            "kv_blocks_free": self.pool.available(),
            "kv_blocks": self.pool.num_blocks,
        }
