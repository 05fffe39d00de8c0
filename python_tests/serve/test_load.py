"""64 concurrent streaming clients against one server (2 generation slots), 10 of which hang up
mid-stream: every other client gets exactly its greedy answer, every generation ends (none left
running or queued), the 10 count as cancelled, and the server keeps answering."""

import asyncio
import json

import httpx
import pytest

from eagle_fast.serve import ServeConfig

from .conftest import png_bytes, serving, user_message, wait_idle

PROMPTS = ["What is this?", "Describe it.", "Which colour?", "Count the shapes."]
N_CLIENTS, N_QUITTERS, MAX_TOKENS = 64, 10, 8


@pytest.fixture(scope="module")
def server(tiny):
    with serving(ServeConfig(model="eagle-tiny-x5", parallel=2), tiny) as (base, _):
        yield base


def _messages(i: int) -> list[dict]:
    k = i % len(PROMPTS)
    if k % 2:  # half the prompts carry an image, of a colour of their own
        return [user_message(PROMPTS[k], png_bytes(48, 32, (60 * k, 40, 200)))]
    return [{"role": "user", "content": PROMPTS[k]}]


async def _client(http: httpx.AsyncClient, base: str, i: int, quit_early: bool):
    body = {
        "model": "m",
        "messages": _messages(i),
        "stream": True,
        "temperature": 0,
        # a quitter asks for a long answer: it is still generating when the client hangs up
        "max_tokens": 400 if quit_early else MAX_TOKENS,
    }
    text, finishes = "", []
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
            if quit_early and text:
                return None  # leaving the block closes the connection mid-stream
    return text, finishes


async def _crowd(base: str):
    quitters = set(range(3, N_CLIENTS, N_CLIENTS // N_QUITTERS)[:N_QUITTERS])
    assert len(quitters) == N_QUITTERS
    limits = httpx.Limits(max_connections=N_CLIENTS + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as http:
        return quitters, await asyncio.gather(*(_client(http, base, i, i in quitters) for i in range(N_CLIENTS)))


def test_many_streams_with_disconnects(server):
    expected = {}
    for k in range(len(PROMPTS)):
        r = httpx.post(
            f"{server}/v1/chat/completions",
            timeout=60,
            json={"messages": _messages(k), "temperature": 0, "max_tokens": MAX_TOKENS},
        ).json()
        expected[k] = (r["choices"][0]["message"]["content"], [r["choices"][0]["finish_reason"]])
    before = wait_idle(server)

    quitters, results = asyncio.run(_crowd(server))
    for i, result in enumerate(results):
        if i in quitters:
            assert result is None
        else:
            assert result == expected[i % len(PROMPTS)], f"client {i}"
    after = wait_idle(server)
    assert after["cancelled"] - before["cancelled"] == N_QUITTERS
    assert after["completed"] - before["completed"] == N_CLIENTS - N_QUITTERS
    assert after["failed"] == 0
    assert httpx.get(f"{server}/v1/models").status_code == 200
