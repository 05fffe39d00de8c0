"""The server on the batch engine: /metrics, 429 on a full queue, and the sequential scheduler
kept as the comparison path giving the same greedy answers."""

import asyncio
import time

import httpx

from eagle_fast.serve import ServeConfig

from .conftest import png_bytes, serving, user_message, wait_idle

BODY = {"messages": [user_message("What is this?", png_bytes())], "temperature": 0, "max_tokens": 6}


def test_metrics_in_prometheus_text(tiny):
    with serving(ServeConfig(model="eagle-tiny-x5"), tiny) as (base, _):
        for _ in range(2):  # the same image twice: the second is an encoder-cache hit
            assert httpx.post(f"{base}/v1/chat/completions", json=BODY, timeout=60).status_code == 200
        wait_idle(base)
        r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in r.text.splitlines() if line and line[0] != "#"}
    assert values["eagle_fast_num_requests_running"] == 0 and values["eagle_fast_num_requests_waiting"] == 0
    assert values["eagle_fast_requests_completed_total"] == 2
    assert values["eagle_fast_encoder_runs_total"] == 1
    assert values["eagle_fast_encoder_cache_hit_rate"] == 0.5  # 1 hit of 2 lookups
    assert values["eagle_fast_prefix_cache_hit_rate"] > 0  # the second prompt is the first's
    assert values['eagle_fast_time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert values["eagle_fast_time_to_first_token_seconds_count"] == 2
    assert "# TYPE eagle_fast_inter_token_latency_seconds histogram" in r.text


def test_full_queue_is_429(tiny):
    async def burst(base):
        async with httpx.AsyncClient(timeout=120) as http:
            body = dict(BODY, max_tokens=30)
            return await asyncio.gather(*(http.post(f"{base}/v1/chat/completions", json=body) for _ in range(12)))

    with serving(ServeConfig(model="eagle-tiny-x5", max_num_seqs=1, max_queue=2), tiny) as (base, _):
        codes = [r.status_code for r in asyncio.run(burst(base))]
        wait_idle(base)
        refused = [r for r in codes if r == 429]
        assert refused and set(codes) == {200, 429}
        r = httpx.post(f"{base}/v1/chat/completions", json=dict(BODY, max_tokens=30), timeout=60)
        assert r.status_code == 200  # once the queue drains, requests are taken again


def test_sequential_scheduler_gives_the_same_answers(tiny):
    answers = {}
    for scheduler in ("batch", "sequential"):
        with serving(ServeConfig(model="eagle-tiny-x5", scheduler=scheduler, parallel=2), tiny) as (base, _):
            r = httpx.post(f"{base}/v1/chat/completions", json=BODY, timeout=60).json()
            answers[scheduler] = r["choices"][0]["message"]["content"]
    assert answers["batch"] == answers["sequential"]


def test_client_gone_before_the_first_byte_is_cancelled(tiny):
    """A streamed request admitted to the engine whose client leaves before the response starts
    (its body generator never runs): cancelled in the engine and counted, not left generating."""
    import json

    from eagle_fast.serve import create_app

    model, tok, proc = tiny
    app = create_app(ServeConfig(model="eagle-tiny-x5"), model=model, tokenizer=tok, processor=proc)
    generator = app.state.generator
    body = json.dumps(dict(BODY, stream=True, max_tokens=200)).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client has gone")  # as uvicorn does once the connection is closed

    async def call():
        from starlette.requests import ClientDisconnect

        try:
            await app(scope, receive, send)
        except (OSError, ClientDisconnect):  # what the server sees of the closed connection
            pass

    asyncio.run(call())
    engine = generator.engine
    assert generator.counts["cancelled"] == 1 and generator.counts["active_generations"] == 0
    for _ in range(600):  # the cancelled request leaves at the engine's next step
        if engine._thread is None:
            engine.step()
        if not engine.has_work():
            break
        time.sleep(0.05)
    assert not engine.has_work()
    assert engine.generated_tokens < 200  # stopped, not generated to its max_tokens
