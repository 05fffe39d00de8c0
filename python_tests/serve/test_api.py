"""The OpenAI-compatible API over real HTTP on loopback, against the tiny model: answers equal the
library's ChatSession, streamed equals whole, SSE framing, usage, stop strings, and every refused
request gets its status and an OpenAI error object while the server keeps serving."""

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from eagle_fast.images import to_rgb_batch
from eagle_fast.inference import ChatSession
from eagle_fast.inference.session import prompt_ids
from eagle_fast.serve import ServeConfig
from eagle_fast.serve.errors import APIError

from .conftest import data_url, png_bytes, serving, user_message, wait_idle

CONTEXT = 512
CONFIG = dict(
    model="eagle-tiny-x5",
    max_images=3,
    max_image_bytes=512 << 10,
    max_body_bytes=2 << 20,
    max_tokens=16,
    context_length=CONTEXT,
)


@pytest.fixture(scope="module")
def server(tiny):
    with serving(ServeConfig(**CONFIG), tiny) as (base, app):
        yield base


def chat(base, messages, **kw):
    return httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "messages": messages, **kw}, timeout=60)


def stream_events(base, messages, **kw) -> list[str]:
    """The data: payloads of a streamed reply, checking the framing line by line on the way."""
    body = {"model": "m", "messages": messages, "stream": True, **kw}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events  # one line each
    return [e[len("data: ") :] for e in events]


def streamed_text(payloads: list[str]) -> tuple[str, list[dict]]:
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def test_health_models_and_page(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["active_generations"] == 0 and health["parallel"] == 1
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "eagle-tiny-x5"
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        asset = httpx.get(f"{server}/static/{name}")
        assert asset.status_code == 200 and "://" not in asset.text  # works offline: nothing from elsewhere
    assert "://" not in page.text and "<script>" not in page.text  # no inline script for the CSP to allow


def test_answer_equals_chat_session_and_stream_equals_whole(server, tiny):
    model, tok, proc = tiny
    img = png_bytes(52, 40, (10, 120, 200))
    msgs = [user_message("What is this?", img)]
    whole = chat(server, msgs, temperature=0, max_tokens=12).json()
    text = whole["choices"][0]["message"]["content"]
    expected = ChatSession(model, tok, proc).send(
        "What is this?", images=[Image.open(io.BytesIO(img))], max_new_tokens=12, temperature=0
    )
    assert text == expected and text
    streamed, chunks = streamed_text(stream_events(server, msgs, temperature=0, max_tokens=12))
    assert streamed == text
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == [whole["choices"][0]["finish_reason"]]  # exactly one chunk finishes
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_usage_counts_image_rows(server, tiny):
    model, tok, _ = tiny
    rows = model.config.mm_grid**2
    ids = prompt_ids("vicuna_v1", [("user", "<image><image>\nCompare.")], tok)
    r = chat(server, [user_message("Compare.", png_bytes(), png_bytes(20, 64))], temperature=0, max_tokens=5).json()
    assert r["usage"]["prompt_tokens"] == len(ids) - 2 + 2 * rows
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 5
    payloads = stream_events(
        server,
        [user_message("Compare.", png_bytes(), png_bytes(20, 64))],
        temperature=0,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    _, chunks = streamed_text(payloads)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == r["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("length") == 1


def test_stop_strings_seed_and_max_completion_tokens(server):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    full = chat(server, msgs, temperature=0, max_tokens=12).json()["choices"][0]["message"]["content"]
    stop = full.split()[2]  # a word in the middle of the greedy answer
    r = chat(server, msgs, temperature=0, max_tokens=12, stop=[stop, "\x00never"]).json()
    assert r["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    streamed, _ = streamed_text(stream_events(server, msgs, temperature=0, max_tokens=12, stop=stop))
    assert streamed == full[: full.index(stop)]
    sampled = [chat(server, msgs, temperature=1.0, top_p=1.0, seed=7, max_tokens=10).json() for _ in range(2)]
    assert sampled[0]["choices"][0]["message"] == sampled[1]["choices"][0]["message"]
    r = chat(server, msgs, temperature=0, max_completion_tokens=3, max_tokens=9).json()
    assert r["usage"]["completion_tokens"] == 3
    for extra in ({"ignore_eos": True}, {"min_tokens": 12}):  # vLLM's extensions: a full-length reply
        r = chat(server, msgs, temperature=0, max_tokens=12, **extra).json()
        assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"


def test_system_prompt_and_multi_turn(server, tiny):
    _, tok, _ = tiny
    msgs = [
        {"role": "system", "content": "Be brief."},
        user_message("Hi", png_bytes()),
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    r = chat(server, msgs, temperature=0, max_tokens=4).json()
    turns = [("user", "<image>\nHi"), ("assistant", "Hello."), ("user", "Again?")]
    from dataclasses import replace

    from eagle_fast.data.templates import get_template

    ids = prompt_ids(replace(get_template("vicuna_v1"), system="Be brief."), turns, tok)
    assert r["usage"]["prompt_tokens"] == len(ids) - 1 + tiny[0].config.mm_grid ** 2


def _bomb() -> bytes:
    buf = io.BytesIO()  # 100 megapixels declared in a ~12 kB file
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")
    return buf.getvalue()


def _image_msg(url: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}
    ]


ERRORS = {
    "bad_base64": (lambda: _image_msg("data:image/png;base64,@@not base64@@"), {}, 400, "invalid_image"),
    "not_an_image": (lambda: _image_msg(data_url(b"GIF89a but not really an image" * 10)), {}, 400, "invalid_image"),
    "png_bomb": (lambda: _image_msg(data_url(_bomb())), {}, 400, "image_too_large"),
    "image_bytes": (lambda: _image_msg(data_url(b"\x89PNG" + bytes(600 << 10))), {}, 413, "image_too_large"),
    "too_many_images": (lambda: [user_message("hi", *[png_bytes()] * 4)], {}, 400, "too_many_images"),
    "remote_url": (lambda: _image_msg("http://example.com/a.png"), {}, 400, "remote_images_disabled"),
    "prompt_too_long": (lambda: [{"role": "user", "content": "hello " * 600}], {}, 400, "context_length_exceeded"),
    "max_tokens_too_many": (
        lambda: [{"role": "user", "content": "hi"}],
        {"max_tokens": 600},
        400,
        "context_length_exceeded",
    ),
    "assistant_last": (
        lambda: [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        {},
        400,
        "invalid_value",
    ),
    "bad_role": (lambda: [{"role": "tool", "content": "a"}], {}, 400, "invalid_value"),
    "bad_temperature": (lambda: [{"role": "user", "content": "a"}], {"temperature": 3}, 400, "invalid_value"),
    "n_2": (lambda: [{"role": "user", "content": "a"}], {"n": 2}, 400, "invalid_value"),
    "bad_ignore_eos": (lambda: [{"role": "user", "content": "a"}], {"ignore_eos": "yes"}, 400, "invalid_type"),
    "min_over_max_tokens": (
        lambda: [{"role": "user", "content": "a"}],
        {"min_tokens": 5, "max_tokens": 2},
        400,
        "invalid_value",
    ),
    "image_placeholder_text": (lambda: [{"role": "user", "content": "<image> hi"}], {}, 400, "invalid_value"),
    "body_too_large": (lambda: [{"role": "user", "content": "a" * (3 << 20)}], {}, 413, "request_too_large"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own notice of the bomb
@pytest.mark.parametrize("case", list(ERRORS))
def test_refused_requests_get_openai_errors(server, case):
    messages, extra, status, code = ERRORS[case]
    r = chat(server, messages(), **extra)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    assert err["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # still serving


def test_image_rows_count_against_the_context(server, tiny):
    _, tok, _ = tiny
    room = CONTEXT - len(prompt_ids("vicuna_v1", [("user", "hi")], tok))
    ok = chat(server, [{"role": "user", "content": "hi"}], max_tokens=room - 20, temperature=0)
    assert ok.status_code == 200  # fits as text, not with two images of mm_grid**2 = 16 rows each
    r = chat(server, [user_message("hi", png_bytes(), png_bytes())], max_tokens=room - 20)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_malformed_bodies(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server}/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_type"
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # chunked upload (no Content-Length) past the limit is cut off while it arrives
    r = httpx.post(f"{server}/v1/chat/completions", content=iter([b"x" * (1 << 20)] * 3))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert wait_idle(server)["failed"] == 0


def test_client_leaving_a_whole_reply_stops_it(server, tiny):
    """A non-streamed request whose client gives up is noticed between two tokens and cancelled."""
    before = wait_idle(server)
    slow = tiny[0].register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # 400 tokens: > 4 s
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server}/v1/chat/completions",
                timeout=httpx.Timeout(60, read=0.5),
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "temperature": 0},
            )
        after = wait_idle(server)
    finally:
        slow.remove()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_api_key(tiny):
    with serving(ServeConfig(model="eagle-tiny-x5", api_key="s3cret"), tiny) as (base, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for r in (
                httpx.get(f"{base}/v1/models", headers=headers),
                httpx.post(
                    f"{base}/v1/chat/completions",
                    headers=headers,
                    json={"messages": [{"role": "user", "content": "hi"}]},
                ),
            ):
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/").status_code == 200  # the page loads, then asks for the key
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/v1/models", headers=ok).status_code == 200
        r = httpx.post(
            f"{base}/v1/chat/completions",
            headers=ok,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_decoded_image_equals_library_input():
    """A JPEG data URL decodes to what PIL gives the library (EXIF orientation applied)."""
    from eagle_fast.serve.images import load_image_url

    jpeg = png_bytes(33, 21, (90, 200, 40), fmt="JPEG")
    im = load_image_url(data_url(jpeg, "image/jpeg"), "p", ServeConfig(model="x"))
    ref = to_rgb_batch([Image.open(io.BytesIO(jpeg))])[0]
    assert im.size == (33, 21) and (to_rgb_batch([im])[0] == ref).all()
    wrapped = "data:image/jpeg;base64," + "\n".join(
        base64.b64encode(jpeg).decode()[i : i + 76] for i in range(0, 4000, 76)
    )
    assert load_image_url(wrapped, "p", ServeConfig(model="x")).size == (33, 21)
    for fmt in ("PNG", "WEBP", "GIF"):
        im = load_image_url(data_url(png_bytes(9, 7, fmt=fmt), f"image/{fmt.lower()}"), "p", ServeConfig(model="x"))
        assert im.size == (9, 7) and im.mode == "RGB"
    with pytest.raises(APIError) as err:  # a format outside the list, even if Pillow reads it
        load_image_url(data_url(png_bytes(9, 7, fmt="BMP"), "image/bmp"), "p", ServeConfig(model="x"))
    assert err.value.status == 400 and err.value.code == "invalid_image"


def test_cli_flags_build_the_config(monkeypatch):
    from eagle_fast.inference.engine import GenerationConfig
    from eagle_fast.serve.__main__ import parse

    monkeypatch.delenv("EAGLE_FAST_API_KEY", raising=False)
    cfg = parse(["--model", "ckpt/", "--parallel", "3", "--allow-remote-images", "--max_image_pixels", "1000"])
    assert (cfg.model, cfg.parallel, cfg.allow_remote_images, cfg.max_image_pixels) == ("ckpt/", 3, True, 1000)
    assert cfg.host == "127.0.0.1" and cfg.served_name() == "ckpt" and cfg.api_key is None
    gen = GenerationConfig()  # one source of the generation defaults
    assert (cfg.max_tokens, cfg.temperature, cfg.top_p) == (gen.max_new_tokens, gen.temperature, gen.top_p)
    monkeypatch.setenv("EAGLE_FAST_API_KEY", "k")
    assert parse(["--model", "m"]).api_key == "k"
    for bad in (
        ["--model", "m", "--port", "80x"],
        ["--model", "m", "--parallel", "0"],
        ["--model", "m", "--max-tok", "9"],
    ):
        with pytest.raises(SystemExit):
            parse(bad)
