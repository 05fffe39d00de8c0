"""Fixtures of the server tests: a tiny random model, a real uvicorn server on a free loopback port
(in a thread of the test process), and image helpers."""

import base64
import contextlib
import io
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from eagle_fast.inference import load_model
from eagle_fast.serve import ServeConfig, create_app


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return load_model("eagle-tiny-x5")


@contextlib.contextmanager
def serving(config: ServeConfig, tiny_model):
    """Runs create_app(config, tiny model) under uvicorn; yields (base URL, app)."""
    model, tokenizer, processor = tiny_model
    app = create_app(config, model=model, tokenizer=tokenizer, processor=processor)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_idle(base: str, headers=None, tries: int = 600) -> dict:
    """/health once no generation runs or waits (polled; fails if that never happens)."""
    health = {}
    for _ in range(tries):
        health = httpx.get(f"{base}/health", headers=headers).json()
        if health["active_generations"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"generations still running: {health}")


def png_bytes(w: int = 40, h: int = 30, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def user_message(text: str, *images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}
