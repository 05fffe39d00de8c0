"""OpenAI chat-completion objects: the whole reply, stream chunks and their SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class Reply:
    """What every object of one completion shares."""

    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(reply: Reply, text: str, finish_reason: str, use: dict) -> dict:
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chunk(reply: Reply, delta: dict, finish_reason: str | None = None, with_usage: bool = False) -> dict:
    out = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:  # with stream_options.include_usage every chunk has the field, null until the last
        out["usage"] = None
    return out


def usage_chunk(reply: Reply, use: dict) -> dict:
    return {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "choices": [],
        "usage": use,
    }


def sse(obj: dict | str) -> bytes:
    """One server-sent event. ASCII-only JSON: it escapes newlines and also U+2028, U+0085, ... that
    line readers built on str.splitlines() would split on, so a payload is always one data: line."""
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")
