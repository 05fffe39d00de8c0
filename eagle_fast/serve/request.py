"""The body of POST /v1/chat/completions -> a checked ChatRequest, or an APIError naming the field.

Messages become the (role, text) turns the chat templates render: system (and "developer")
messages are joined into the template's system prompt, consecutive messages of one role are
merged, and each user turn's images become "<image>" placeholders at its start, in order (as
ChatSession does). Sampling fields follow OpenAI's names and ranges; `top_k`,
`repetition_penalty`, `ignore_eos` and `min_tokens` are accepted as extensions (vLLM's names and
meaning: EOS does not end the reply / no stop token before min_tokens tokens). Fields with no meaning here (`user`, `metadata`,
`frequency_penalty`, ...) are ignored; ones that would silently change the answer's meaning
(`n` > 1, `tools`, `logprobs`) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eagle_fast.data.tokenize import IMAGE_TOKEN
from eagle_fast.serve.config import ServeConfig
from eagle_fast.serve.errors import bad_request


@dataclass
class ChatRequest:
    turns: list[tuple[str, str]]  # user first, alternating; "<image>" placeholders in user turns
    system: str | None = None
    image_urls: list[tuple[str, str]] = field(default_factory=list)  # (url, param) in prompt order
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0


def _number(
    body: dict, name: str, lo: float, hi: float | None = None, integer: bool = False, lo_open: bool = False
) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad_request(f"{name} must be {'an integer' if integer else 'a number'}", name, "invalid_type")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise bad_request(f"{name} must be {bound}, got {value}", name)
    return value


def _content(content: Any, param: str, images: bool) -> tuple[str, list[tuple[str, str]]]:
    """A message's content (a string or a list of parts) -> (text, [(image url, param)])."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content parts", param, "invalid_type")
    texts, urls = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request('image_url must be {"url": "data:image/...;base64,..."}', where, "invalid_type")
            urls.append((url, f"{where}.image_url"))
        elif kind == "image_url":
            raise bad_request("only user messages may carry images", where, "invalid_value")
        else:
            raise bad_request(
                f"unsupported content part {kind!r} (supported: text, image_url)", where, "unsupported_content"
            )
    return "\n".join(texts), urls


def _messages(body: dict, cfg: ServeConfig, req: ChatRequest) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages", "invalid_type")
    systems: list[str] = []
    turns: list[list] = []  # [role, number of images, [texts]]
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request("each message must be an object with role and content", param, "invalid_type")
        role = msg.get("role")
        if role in ("system", "developer"):
            systems.append(_content(msg.get("content"), f"{param}.content", images=False)[0])
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"unsupported role {role!r} (supported: system, user, assistant)", f"{param}.role")
        text, urls = _content(msg.get("content"), f"{param}.content", images=role == "user")
        if IMAGE_TOKEN in text:  # it would count as an image placeholder without an image
            raise bad_request(
                f"message text must not contain {IMAGE_TOKEN!r}; send images as image_url parts", f"{param}.content"
            )
        req.image_urls += urls
        if turns and turns[-1][0] == role:
            turns[-1][1] += len(urls)
            turns[-1][2].append(text)
        else:
            turns.append([role, len(urls), [text]])
    if not turns or turns[0][0] != "user":
        raise bad_request("the conversation must start with a user message (after any system messages)", "messages")
    if turns[-1][0] != "user":
        raise bad_request("the last message must be from the user", "messages")
    if len(req.image_urls) > cfg.max_images:
        raise bad_request(
            f"{len(req.image_urls)} images in the request; this server accepts at most {cfg.max_images}",
            "messages",
            "too_many_images",
        )
    req.system = "\n".join(systems) if systems else None
    req.turns = [(role, IMAGE_TOKEN * n + ("\n" if n else "") + "\n".join(texts)) for role, n, texts in turns]


def _stop(body: dict, cfg: ServeConfig) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stops) > cfg.max_stop:
        raise bad_request(f"at most {cfg.max_stop} stop strings", "stop")
    return tuple(stops)


def parse_chat_request(body: Any, cfg: ServeConfig) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_type")
    req = ChatRequest(turns=[])
    _messages(body, cfg, req)
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools and function calling are not supported", "tools", "unsupported_parameter")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, (bool, type(None))):
        raise bad_request("stream must be a boolean", "stream", "invalid_type")
    req.stream = bool(stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    req.include_usage = bool(options.get("include_usage", False))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    req.max_tokens = _number(body, name, 1, integer=True)
    req.temperature = _number(body, "temperature", 0, 2)
    req.top_p = _number(body, "top_p", 0, 1, lo_open=True)
    req.top_k = _number(body, "top_k", 0, integer=True)
    req.repetition_penalty = _number(body, "repetition_penalty", 0, lo_open=True)
    seed = _number(body, "seed", -(2**63), 2**64 - 1, integer=True)
    req.seed = None if seed is None else seed % (2**63)  # any 64-bit seed -> torch's accepted range
    req.stop = _stop(body, cfg)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, (bool, type(None))):
        raise bad_request("ignore_eos must be a boolean", "ignore_eos", "invalid_type")
    req.ignore_eos = bool(ignore_eos)
    req.min_tokens = _number(body, "min_tokens", 0, integer=True) or 0
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise bad_request(f"min_tokens {req.min_tokens} exceeds max_tokens {req.max_tokens}", "min_tokens")
    return req
