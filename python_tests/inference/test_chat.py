"""Engine and chat session on the tiny preset: greedy equals HF generate, streaming equals
non-streaming, UTF-8-safe deltas, stop strings, context overflow."""

import numpy as np
import pytest
import torch

from eagle_fast.inference import ChatSession, Engine, GenerationConfig, load_model
from eagle_fast.inference.session import safe_text_length


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("eagle-tiny-x5")


def _img(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)


def test_greedy_engine_equals_hf_generate(tiny):
    model, tok, proc = tiny
    ids = [1, -200, 523, 880, 28804]
    images = proc([_img()])
    ours = list(
        Engine(model, tok).stream(ids, images, GenerationConfig(max_new_tokens=8, do_sample=False, stop_ids=()))
    )
    hf = model.generate(
        torch.tensor([ids]), images=images, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ours == hf[0].tolist()


def test_streaming_equals_non_streaming_and_history(tiny):
    model, tok, proc = tiny
    kw = dict(max_new_tokens=12, do_sample=False)
    a = ChatSession(model, tok, proc)
    streamed = "".join(a.send("What is this?", images=[_img()], stream=True, **kw))
    b = ChatSession(model, tok, proc)
    whole = b.send("What is this?", images=[_img()], **kw)
    assert streamed == whole and a.history == b.history
    assert a.history[0] == ("user", "<image>\nWhat is this?") and a.history[1] == ("assistant", whole)
    again = a.send("And now?", **kw)  # second turn: same image in the history
    assert len(a.history) == 4 and isinstance(again, str)
    a.reset()
    assert a.history == []


def test_sampling_is_seeded(tiny):
    model, tok, proc = tiny
    run = lambda: ChatSession(model, tok, proc).send("Hi", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    assert run() == run()


def test_deltas_never_split_characters_or_leak_stop_strings():
    safe = safe_text_length
    assert safe("ab\ufffd", ()) == 2  # an incomplete multi-byte character is held back
    assert safe("hello</", ("</s>",)) == 5  # may be the start of the stop string
    assert safe("hello</s>more", ("</s>",)) == 5
    assert safe("héllo 😀 日本", ()) == len("héllo 😀 日本")


def test_utf8_deltas_on_real_byte_tokens(tiny):
    """Emoji and CJK decode through byte tokens: the streamed deltas never contain U+FFFD and join
    to the full text."""
    _, tok, _ = tiny
    ids = tok("日本語 😀 ok", add_special_tokens=False)["input_ids"]
    pieces, emitted = [], ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        cut = safe_text_length(text, ())
        if cut > len(emitted):
            pieces.append(text[len(emitted) : cut])
            emitted = text[:cut]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == tok.decode(ids)


def test_context_overflow_is_an_error(tiny):
    model, tok, proc = tiny
    with pytest.raises(ValueError, match="exceeds the context"):
        list(
            Engine(model, tok, context_length=30).stream(
                [1, -200, 5], proc([_img()]), GenerationConfig(max_new_tokens=20)
            )
        )


@pytest.fixture(scope="module")
def saved_cli(tiny, tmp_path_factory):
    from PIL import Image

    model, tok, proc = tiny
    d = tmp_path_factory.mktemp("cli")
    for part in (model, tok, proc):
        part.save_pretrained(d / "ckpt")
    Image.fromarray(_img()).save(d / "img.png")
    return d


def _cli(args, stdin=None):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run(
        [sys.executable, "-m", "eagle_fast.chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=root),
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_cli_one_shot_on_a_saved_checkpoint(tiny, saved_cli):
    model, tok, proc = tiny
    out = _cli(
        [
            "--model",
            str(saved_cli / "ckpt"),
            "--image",
            str(saved_cli / "img.png"),
            "--prompt",
            "What is this?",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ]
    )
    chat = ChatSession(model, tok, proc)
    want = chat.send("What is this?", images=[_img()], max_new_tokens=6, temperature=0)
    assert out.rstrip("\n") == want


def test_cli_interactive_commands(tiny, saved_cli):
    """/image attaches to the next message, a bad path is reported and the session goes on,
    /reset starts over, /quit ends; answers equal the Python API's."""
    model, tok, proc = tiny
    script = (
        f"/image {saved_cli / 'img.png'}\n/image {saved_cli / 'missing.png'}\nWhat is this?\n"
        "And now?\n/reset\nHello\n/quit\nnever read\n"
    )
    out = _cli(["--model", str(saved_cli / "ckpt"), "--max-new-tokens", "5", "--temperature", "0"], stdin=script)
    chat = ChatSession(model, tok, proc, max_new_tokens=5, temperature=0)
    first = chat.send("What is this?", images=[_img()])
    second = chat.send("And now?")
    chat.reset()
    third = chat.send("Hello")
    assert "(1 image(s) attached to the next message)" in out and "cannot open" in out
    assert "(new conversation)" in out
    lines = out.split("> ")
    answers = [seg.rstrip("\n") for seg in lines if seg and not seg.startswith("(")]
    assert answers == [first, second, third], out


def test_images_as_file_paths(tiny, tmp_path):
    from PIL import Image

    model, tok, proc = tiny
    Image.fromarray(_img()).save(tmp_path / "a.png")
    by_path = ChatSession(model, tok, proc).send(
        "What is this?", images=[str(tmp_path / "a.png")], max_new_tokens=6, temperature=0
    )
    by_array = ChatSession(model, tok, proc).send("What is this?", images=[_img()], max_new_tokens=6, temperature=0)
    assert by_path == by_array
    with pytest.raises(ValueError, match="no such file"):
        ChatSession(model, tok, proc).send("Hi", images=[str(tmp_path / "missing.png")])
