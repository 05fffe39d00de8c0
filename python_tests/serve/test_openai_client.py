"""The official openai client against the server: whole and streamed replies, images, usage,
and errors raised as the client's own exception types."""

import openai
import pytest

from eagle_fast.serve import ServeConfig

from .conftest import png_bytes, serving, user_message, wait_idle


@pytest.fixture(scope="module")
def client(tiny):
    with serving(ServeConfig(model="eagle-tiny-x5", api_key="k-123"), tiny) as (base, _):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0, timeout=60), base


def test_models_and_whole_reply(client):
    c, _ = client
    assert [m.id for m in c.models.list()] == ["eagle-tiny-x5"]
    r = c.chat.completions.create(
        model="eagle-tiny-x5", messages=[user_message("What is it?", png_bytes())], temperature=0, max_tokens=10
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert r.usage.prompt_tokens > 16 and r.usage.completion_tokens <= 10


def test_streamed_reply_equals_whole(client):
    c, base = client
    kw = dict(
        model="eagle-tiny-x5",
        messages=[user_message("What is it?", png_bytes(64, 48, (0, 0, 255)))],
        temperature=0,
        max_tokens=10,
    )
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # a stream the client abandons early is stopped on the server
    stream = c.chat.completions.create(stream=True, **dict(kw, max_tokens=400))
    next(iter(stream))
    stream.close()
    assert wait_idle(base)["cancelled"] >= 1


def test_errors_are_client_exceptions(client):
    c, base = client
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert err.value.code == "context_length_exceeded"
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
