"""Engine: image-prefix KV reuse across turns (same tokens as a fresh full prefill, experts not
re-run, invalidation on edits and on other images) and batch generation (left padding) equal to
one-by-one greedy generation."""

import numpy as np
import pytest
import torch

from eagle_fast.inference import ChatSession, Engine, GenerationConfig, load_model
from eagle_fast.inference.engine import KVPrefix

GREEDY = dict(max_new_tokens=10, do_sample=False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("eagle-tiny-x5")


def _img(seed=0, shape=(40, 52, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class _CountEncodes:
    """Counts the images the vision experts encode."""

    def __init__(self, model, monkeypatch):
        self.images = 0
        inner = model.encode_images

        def counted(images):
            self.images += images["pixel_values"].shape[0]
            return inner(images)

        monkeypatch.setattr(model, "encode_images", counted)


def _conversation(chat, stream=False):
    out = [chat.send("What is this?", images=[_img(0)], **GREEDY)]
    out.append(chat.send("And its colour?", **GREEDY))
    out.append(chat.send("Compare with this one.", images=[_img(1)], **GREEDY))
    return out


def test_second_turn_reuses_the_prefix_and_matches_a_fresh_prefill(tiny, monkeypatch):
    model, tok, proc = tiny
    fresh = _conversation(ChatSession(model, tok, proc, reuse_prefix=False))
    counter = _CountEncodes(model, monkeypatch)
    assert _conversation(ChatSession(model, tok, proc)) == fresh  # the batch engine's prefix cache
    assert counter.images == 2  # each image encoded once: turns 2 and 3 reused the first
    chat = ChatSession(model, tok, proc, scheduler="sequential")
    assert _conversation(chat) == fresh
    assert counter.images == 4  # the sequential engine's own per-conversation prefix: again once each
    # the cache holds the whole conversation but the last reply's final token (never fed)
    prefix = chat._prefix
    assert prefix.cache.get_seq_length() == Engine(model, tok)._rows(prefix.units)
    assert sum(isinstance(u, tuple) for u in prefix.units) == 2


def test_prefix_feeds_only_the_new_turn(tiny):
    model, tok, proc = tiny
    eng, prefix = Engine(model, tok), KVPrefix()
    images = proc([_img(0)])
    first = [1, -200, 523, 880, 28804]
    reply = list(eng.stream(first, images, GenerationConfig(**GREEDY, stop_ids=()), prefix=prefix))
    rows_after_turn1 = prefix.cache.get_seq_length()
    second = first + reply + [523, 880]
    fed = []
    orig = model.forward

    def spy(*a, **kw):
        x = kw.get("input_ids")
        fed.append(x.shape[1] if x is not None else kw["inputs_embeds"].shape[1])
        return orig(*a, **kw)

    model.forward = spy
    try:
        got = list(eng.stream(second, images, GenerationConfig(**GREEDY, stop_ids=()), prefix=prefix))
    finally:
        del model.forward
    # turn 1 fed all but its last generated token; turn 2 feeds that token and the new text only
    assert rows_after_turn1 == 4 + 16 + len(reply) - 1 and fed[0] == 3
    assert got == list(eng.stream(second, images, GenerationConfig(**GREEDY, stop_ids=())))


def test_edits_and_other_images_invalidate(tiny, monkeypatch):
    model, tok, proc = tiny
    chat = ChatSession(model, tok, proc)
    chat.send("What is this?", images=[_img(0)], **GREEDY)
    chat.history[0] = ("user", "<image>\nWhat is that?")  # an edited turn
    edited = chat.send("Really?", **GREEDY)
    ref = ChatSession(model, tok, proc, reuse_prefix=False)
    ref.history, ref._images = list(chat.history[:2]), list(chat._images)
    assert edited == ref.send("Really?", **GREEDY)

    counter = _CountEncodes(model, monkeypatch)
    chat._images[0] = proc([_img(7)])  # same text, another image: its digest differs
    other = chat.send("Once more.", **GREEDY)
    ref2 = ChatSession(model, tok, proc, reuse_prefix=False)
    ref2.history, ref2._images = list(chat.history[:-2]), list(chat._images)
    assert other == ref2.send("Once more.", **GREEDY) and counter.images == 2


def test_an_abandoned_stream_leaves_a_usable_prefix(tiny):
    model, tok, proc = tiny
    chat = ChatSession(model, tok, proc)
    stream = chat.send("Describe it.", images=[_img(0)], stream=True, max_new_tokens=20, temperature=0)
    next(stream)
    stream.close()  # the client went away mid-reply
    after = chat.send("Go on.", **GREEDY)
    ref = ChatSession(model, tok, proc, reuse_prefix=False)
    ref.history, ref._images = list(chat.history[:2]), list(chat._images)
    assert after == ref.send("Go on.", **GREEDY)


def test_batch_generation_equals_one_by_one(tiny):
    model, tok, proc = tiny
    eng = Engine(model, tok)
    prompts = [[1, -200, 523, 880, 28804], [1, 330, 1179], [1, -200, -200, 523, 880, 28804, 4777, 272, 7839]]
    images = [proc([_img(0)]), None, proc([_img(1, (64, 30, 3)), _img(2)])]
    gen = GenerationConfig(max_new_tokens=12, do_sample=False, stop_ids=())
    one = [list(eng.stream(p, im, gen)) for p, im in zip(prompts, images)]
    assert eng.generate_batch(prompts, images, gen) == one
    # stop ids end rows at different steps; the others continue unaffected
    stop = GenerationConfig(max_new_tokens=12, do_sample=False, stop_ids=(one[1][3],))
    assert eng.generate_batch(prompts, images, stop) == [
        list(eng.stream(p, im, stop)) for p, im in zip(prompts, images)
    ]


def test_batch_overflow_names_the_prompt(tiny):
    model, tok, proc = tiny
    eng = Engine(model, tok, context_length=40)
    with pytest.raises(ValueError, match="prompt 1 of"):
        eng.generate_batch([[1, 2], [1] + [5] * 35], None, GenerationConfig(max_new_tokens=8))


def test_image_digests_come_from_host_bytes_not_from_device_tensors(tiny, monkeypatch):
    """The processor digests each decoded image's host bytes; the engine reads those (no copy of
    the preprocessed tensors back from the model's device); one changed pixel is another image."""
    from eagle_fast.data.collate import concat_images, select_images
    from eagle_fast.inference.engine import image_digests

    _, _, proc = tiny
    a, b = _img(0), _img(0).copy()
    b[3, 4, 1] ^= 1
    out = proc([a, b, a])
    d = out["image_digests"]
    assert len(d) == 3 and d[0] == d[2] != d[1]

    def no_host_copy(*args, **kw):
        raise AssertionError("preprocessed tensors copied to the host to digest them")

    monkeypatch.setattr(torch.Tensor, "numpy", no_host_copy)
    assert image_digests(out) == d
    assert image_digests(select_images(out, [2, 1])) == [d[2], d[1]]
    assert image_digests(concat_images([select_images(out, [1]), select_images(out, [0])])) == [d[1], d[0]]


def test_chat_preprocesses_on_the_model_device(tiny, monkeypatch):
    """ChatSession hands the processor the model's device (on CUDA: a uint8 upload, then the CUDA
    fused_preprocess); the engine moves any processor output to the model before the forward."""
    from eagle_fast.data.collate import to_device

    model, tok, proc = tiny
    seen = []
    real = type(proc).__call__

    def spy(self, images, device=None):
        seen.append(device)
        return real(self, images, device=device)

    monkeypatch.setattr(type(proc), "__call__", spy)
    ChatSession(model, tok, proc).send("What is this?", images=[_img(0)], max_new_tokens=2, do_sample=False)
    assert seen == [model.device]
    moved = to_device(proc([_img(1)]), "meta")
    assert moved["pixel_values"].device.type == "meta" and isinstance(moved["image_digests"][0], str)
    assert all(
        t.device.type == "meta"
        for v in moved["expert_inputs"].values()
        for t in (v.values() if isinstance(v, dict) else [v])
    )
