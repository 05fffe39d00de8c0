"""BatchEngine (continuous batching, paged KV, encoder and prefix caches) against one-at-a-time
generation on a tiny random model in fp32."""

import numpy as np
import pytest
import torch

from eagle_fast.inference import load_model
from eagle_fast.inference.batch_engine import BatchEngine
from eagle_fast.inference.engine import Engine, GenerationConfig
from eagle_fast.inference.kv_cache import BlockPool
from eagle_fast.inference.paged_llm import kv_shape
from eagle_fast.inference.scheduler import EngineConfig, QueueFull

TIE = 1e-4  # a one-at-a-time top-2 logit gap below this may flip under other summation orders


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("eagle-tiny-x5")


@pytest.fixture(scope="module")
def workload(tiny):
    _, _, proc = tiny
    rng = np.random.default_rng(0)
    imgs = [proc([rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)]) for _ in range(3)]
    prompts = [
        [1, 5, 6, -200, 7, 8, 9],
        [1, 10, 11, 12, 13],
        [1, -200, 20, 21],
        [1, 5, 6, -200, 7, 8, 9, 30],
        [1, -200, 40, 41, 42, 43, 44, 45, 46, 47, 48],
        [1, 50],
    ]
    images = [imgs[0], None, imgs[1], imgs[0], imgs[2], None]
    return prompts, images


def _one_at_a_time(tiny, prompts, images, gen):
    model, tok, _ = tiny
    return [list(Engine(model, tok).stream(p, im, gen)) for p, im in zip(prompts, images)]


def _near_ties(tiny, prompt, images, tokens) -> list[float]:
    """The one-at-a-time top-2 logit gap at each generated position (one HF forward over it all)."""
    model, _, _ = tiny
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids, images=images).logits[0, -len(tokens) - 1 : -1]
    top = logits.float().topk(2, -1).values
    return (top[:, 0] - top[:, 1]).tolist()


def _compare(tiny, prompts, images, ref, out) -> int:
    """Asserts equality except at a first divergence whose reference gap is a near tie; returns
    how many such positions were found."""
    ties = 0
    for i, (r, o) in enumerate(zip(ref, out)):
        if r == o:
            continue
        k = next((j for j, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
        gap = _near_ties(tiny, prompts[i], images[i], r)[k] if k < len(r) else float("inf")
        assert gap < TIE, (
            f"prompt {i}: token {k} differs ({r[k : k + 3]} vs {o[k : k + 3]}), one-at-a-time gap {gap:.2e}"
        )
        ties += 1
    return ties


@pytest.mark.parametrize(
    "config",
    [EngineConfig(), EngineConfig(block_size=4, max_batched_tokens=7), EngineConfig(block_size=4, max_num_seqs=2)],
    ids=["default", "chunked-prefill", "two-at-once"],
)
def test_greedy_equals_one_at_a_time(tiny, workload, config):
    model, tok, _ = tiny
    prompts, images = workload
    gen = GenerationConfig(max_new_tokens=16, temperature=0, stop_ids=())
    ref = _one_at_a_time(tiny, prompts, images, gen)
    engine = BatchEngine(model, tok, config)
    out = engine.generate_batch(prompts, images, gen)
    ties = _compare(tiny, prompts, images, ref, out)
    print(f"near-tie divergences: {ties}")
    assert [len(o) for o in out] == [16] * len(prompts)
    assert engine.stats()["running"] == 0 and engine.pool.available() == engine.pool.num_blocks


def test_preemption_under_a_small_kv_budget(tiny, workload):
    model, tok, _ = tiny
    prompts, images = workload
    gen = GenerationConfig(max_new_tokens=24, temperature=0, stop_ids=())
    layers, hkv, hd = kv_shape(model)
    per_block = BlockPool.bytes_per_block(layers, 4, hkv, hd, torch.float32)
    # the longest prompt: 1 + 16 image rows + 10 text = 27 rows, + 24 tokens = 51 rows = 13 blocks of 4;
    # 16 blocks hold it but not two sequences at full length
    engine = BatchEngine(model, tok, EngineConfig(block_size=4, kv_cache_bytes=16 * per_block))
    assert engine.pool.num_blocks == 16
    out = engine.generate_batch(prompts, images, gen)
    assert engine.scheduler.preemptions > 0
    _compare(tiny, prompts, images, _one_at_a_time(tiny, prompts, images, gen), out)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny, workload):
    model, tok, _ = tiny
    prompts, images = workload
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=123, stop_ids=())
    alone = BatchEngine(model, tok).generate_batch(prompts[:1], images[:1], gen)[0]
    crowd = BatchEngine(model, tok, EngineConfig(max_batched_tokens=9)).generate_batch(prompts, images, gen)[0]
    assert alone == crowd
    assert alone == list(Engine(model, tok).stream(prompts[0], images[0], gen))


def test_one_image_in_many_requests_runs_the_experts_once(tiny, workload):
    model, tok, _ = tiny
    _, images = workload
    engine = BatchEngine(model, tok)
    calls = []
    original = model.encode_images
    model.encode_images = lambda im: calls.append(1) or original(im)
    try:
        gen = GenerationConfig(max_new_tokens=2, temperature=0, stop_ids=())
        engine.generate_batch([[1, -200, 60 + i] for i in range(16)], [images[0]] * 16, gen)
    finally:
        del model.encode_images
    assert len(calls) == 1 and engine.encoders.encoded == 1


def test_shared_prefix_blocks_are_computed_once(tiny, workload):
    model, tok, _ = tiny
    _, images = workload
    engine = BatchEngine(model, tok, EngineConfig(block_size=4))
    gen = GenerationConfig(max_new_tokens=3, temperature=0, stop_ids=())
    # 1 + 16 image rows + 5 text rows = 22 rows: the first holds (22 - 1) // 4 = 5 full blocks
    # before its last row; the second shares the first 1 + 16 + 3 = 20 rows = 5 blocks
    first = [1, -200, 70, 71, 72, 73, 74]
    second = [1, -200, 70, 71, 72, 80, 81]
    engine.generate_batch([first], [images[0]], gen)
    assert (engine.pool.queried_blocks, engine.pool.hit_blocks) == (5, 0)
    engine.generate_batch([second], [images[0]], gen)
    assert (engine.pool.queried_blocks, engine.pool.hit_blocks) == (10, 5)
    assert engine.encoders.hits == 1


def test_cancel_frees_the_blocks_and_queue_limit(tiny):
    model, tok, _ = tiny
    engine = BatchEngine(model, tok, EngineConfig(max_queue=2))
    gen = GenerationConfig(max_new_tokens=50, temperature=0, stop_ids=())
    it = engine.stream([1, 5, 6, 7], None, gen)
    next(it), next(it)
    assert engine.stats()["running"] == 1
    it.close()
    engine.step()
    assert engine.stats()["running"] == 0 and engine.pool.available() == engine.pool.num_blocks
    sink = [].append
    engine.submit([1, 2], None, gen, sink)
    engine.submit([1, 3], None, gen, sink)
    with pytest.raises(QueueFull):
        engine.submit([1, 4], None, gen, sink)


def test_background_thread_serves_concurrent_streams(tiny, workload):
    model, tok, _ = tiny
    prompts, images = workload
    gen = GenerationConfig(max_new_tokens=8, temperature=0, stop_ids=())
    ref = _one_at_a_time(tiny, prompts, images, gen)
    engine = BatchEngine(model, tok).start()
    try:
        streams = [engine.stream(p, im, gen) for p, im in zip(prompts, images)]
        _compare(tiny, prompts, images, ref, [list(s) for s in streams])
    finally:
        engine.shutdown()


def test_chat_turns_reuse_the_prefix_cache(tiny):
    from eagle_fast.inference import ChatSession

    model, tok, proc = tiny
    image = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    replies = {}
    for scheduler in ("batch", "sequential"):
        chat = ChatSession(model, tok, proc, scheduler=scheduler, max_new_tokens=6, temperature=0)
        replies[scheduler] = [chat.send("What is it?", images=[image]), chat.send("And the colour?")]
        if scheduler == "batch":
            pool, enc = chat.engine.pool, chat.engine.encoders
            assert pool.hit_blocks > 0  # turn 2 starts from turn 1's blocks
            assert enc.encoded == 1  # the image's experts ran once for both turns
    assert replies["batch"] == replies["sequential"]


def test_long_prompt_chunks_mixed_with_decode_rows_equal_one_at_a_time(tiny, workload, monkeypatch):
    """Prompt chunks long enough for the C++ kernel's tiled path (8 rows or more), short ones and
    decode rows, packed into the same steps, give the one-at-a-time tokens."""
    from eagle_fast.inference import paged_llm

    seen = []
    attend = paged_llm.paged_attention

    def spy(q, k, v, table, cu, lk, **kw):
        seen.append(torch.diff(cu).tolist())
        return attend(q, k, v, table, cu, lk, **kw)

    monkeypatch.setattr(paged_llm, "paged_attention", spy)
    model, tok, _ = tiny
    _, images = workload
    prompts = [[1] + list(range(100, 140)) + [-200, 7, 8], [1, 5], [1, -200] + list(range(200, 230))]
    imgs = [images[0], None, images[2]]
    gen = GenerationConfig(max_new_tokens=6, temperature=0)
    ref = _one_at_a_time(tiny, prompts, imgs, gen)
    out = BatchEngine(model, tok, EngineConfig(block_size=4, max_batched_tokens=48)).generate_batch(prompts, imgs, gen)
    ties = _compare(tiny, prompts, imgs, ref, out)
    print(f"near ties: {ties}")
    # some step held a long chunk beside a decode row or a short chunk
    assert any(max(rows) >= 8 and min(rows) < 8 for rows in seen)


def test_ignore_eos_and_min_new_tokens_on_every_path(tiny, workload):
    """vLLM's ignore_eos / min_tokens: with EOS set to each prompt's own first greedy token, the
    default stops at once; ignore_eos runs to max_new_tokens with the EOS-free tokens; min_new_tokens
    forbids the stop id (so the reply differs) for its first tokens — the same on the sequential
    stream, its static batches and the batch engine."""
    model, tok, _ = tiny
    prompts, images = workload
    free = _one_at_a_time(tiny, prompts, images, GenerationConfig(max_new_tokens=8, temperature=0, stop_ids=()))
    old = tok.eos_token_id
    try:
        for i, (p, im) in enumerate(zip(prompts, images)):
            tok.eos_token_id = free[i][0]
            plain = GenerationConfig(max_new_tokens=8, temperature=0)
            assert list(Engine(model, tok).stream(p, im, plain)) == []
            ignore = GenerationConfig(max_new_tokens=8, temperature=0, ignore_eos=True)
            at_least = GenerationConfig(max_new_tokens=8, temperature=0, min_new_tokens=3)
            for gen in (ignore, at_least):
                outs = [
                    list(Engine(model, tok).stream(p, im, gen)),
                    Engine(model, tok).generate_batch([p], [im], gen)[0],
                    BatchEngine(model, tok).generate_batch([p], [im], gen)[0],
                ]
                assert outs[1] == outs[0] and outs[2] == outs[0], (i, gen, outs)
                if gen.ignore_eos:
                    assert outs[0] == free[i]  # EOS never consulted: the stop-free reply
                else:
                    assert len(outs[0]) >= 3 and free[i][0] not in outs[0][:3]
    finally:
        tok.eos_token_id = old


def test_has_work_counts_a_request_not_yet_taken_in(tiny):
    """submit() only queues; a caller stepping `while has_work()` must still run it to its end."""
    model, tok, _ = tiny
    engine = BatchEngine(model, tok)
    events: list = []
    engine.submit([1, 5, 6, 7], None, GenerationConfig(max_new_tokens=3, temperature=0, stop_ids=()), events.append)
    assert engine.has_work()
    while engine.has_work():
        engine.step()
    assert [k for k, _ in events] == ["token", "token", "token", "done"]


def test_experts_run_just_in_time(tiny, workload):
    """An image's experts run in the step that can admit its request, not ahead of it: experts run
    early for later requests would only delay the first tokens of the requests before them."""
    model, tok, proc = tiny
    rng = np.random.default_rng(1)
    images = [proc([rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]) for _ in range(4)]
    engine = BatchEngine(model, tok)
    rows = engine.rows([1, -200, 5])
    engine = BatchEngine(model, tok, EngineConfig(max_batched_tokens=max(2, rows // 2)))  # prefill: 2+ steps
    gen = GenerationConfig(max_new_tokens=3, temperature=0, stop_ids=())
    streams = [[] for _ in images]
    for im, out in zip(images, streams):
        engine.submit([1, -200, 5], im, gen, out.append)
    trace = []
    while engine.has_work():
        engine.step()
        admitted = len(images) - len(engine.scheduler.waiting) - len(engine._incoming)
        trace.append((engine.encoders.encoded, admitted))
    assert all(encoded <= admitted for encoded, admitted in trace), trace
    assert engine.encoders.encoded == len(images)
    ref = _one_at_a_time(tiny, [[1, -200, 5]] * 4, images, gen)
    assert [[v for k, v in out if k == "token"] for out in streams] == ref
