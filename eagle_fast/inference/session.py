"""ChatSession: multi-turn chat with images, streaming UTF-8-safe text deltas.

    chat = ChatSession(model, tokenizer, processor, template="vicuna_v1")
    for delta in chat.send("What is written on the sign?", images=[img], stream=True):
        print(delta, end="")
    answer = chat.send("And its colour?")      # non-streaming: the whole reply

Each turn renders the whole conversation with the template (images as "<image>" placeholders at
the start of their turn) and generates from it on the continuous-batching engine (BatchEngine):
the conversation so far stays in its prefix cache (block-granular) and its images in its encoder
cache, so a later turn neither re-encodes the images nor re-prefills the earlier turns (an edit to
`history` simply stops matching from the edited block on). `scheduler="sequential"` keeps the
one-request `Engine` with its own per-conversation KV prefix (the comparison path). Deltas are cut from the
incrementally decoded text only where it is complete: a multi-byte character split across tokens
is never emitted in halves, and text that may begin a stop string is held back until it is known
not to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from eagle_fast.data.collate import concat_images
from eagle_fast.data.templates import get_template
from eagle_fast.data.tokenize import IMAGE_TOKEN, encode_prompt
from eagle_fast.images import to_rgb_batch
from eagle_fast.inference.batch_engine import BatchEngine
from eagle_fast.inference.engine import Engine, GenerationConfig, KVPrefix
from eagle_fast.inference.scheduler import EngineConfig


def prompt_ids(template, turns: list[tuple[str, str]], tokenizer) -> list[int]:
    """(role, text) turns ("user"/"assistant", alternating; images as "<image>" placeholders) -> the
    prompt's ids, ending with the assistant's generation prompt; -200 where each image goes."""
    template = get_template(template)
    text = "".join(s.text for s in template.render(turns, tokenizer, add_generation_prompt=True))
    ids, _ = encode_prompt(text, tokenizer, template.adds_bos)
    return ids


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        processor,
        template: str = "vicuna_v1",
        reuse_prefix: bool = True,
        scheduler: str = "batch",
        **generation: Any,
    ):
        if scheduler not in ("batch", "sequential"):
            raise ValueError(f"scheduler must be 'batch' or 'sequential', got {scheduler!r}")
        self.template = get_template(template)
        self.reuse_prefix = reuse_prefix  # keep the conversation's KV cache between turns
        # without reuse, every turn is computed afresh: the sequential engine with no prefix
        self.scheduler = scheduler if reuse_prefix else "sequential"
        self.engine = (
            BatchEngine(model, tokenizer, EngineConfig(max_num_seqs=1))
            if self.scheduler == "batch"
            else Engine(model, tokenizer)
        )
        self.tokenizer, self.processor = tokenizer, processor
        stop = tuple(s for s in (self.template.stop,) if s)
        self.defaults = dataclasses.replace(GenerationConfig(stop=stop), **generation)
        self.reset()

    def reset(self) -> None:
        self.history: list[tuple[str, str]] = []  # (role, text with <image> placeholders)
        self._images: list[dict[str, Any]] = []  # processor outputs, in order of appearance
        self._prefix = KVPrefix()

    def _prompt(self) -> list[int]:
        return prompt_ids(self.template, self.history, self.tokenizer)

    def send(self, text: str, images: list | None = None, stream: bool = False, **generation: Any):
        """Adds a user turn (with its images) and generates the reply: the whole text, or (stream=True)
        an iterator of text deltas. Per-call options override the session's GenerationConfig."""
        images = list(images or [])
        if IMAGE_TOKEN in text:
            raise ValueError(f"pass images through `images=`, not as {IMAGE_TOKEN!r} in the text")
        if images:
            self._images.append(self.processor(to_rgb_batch(images), device=self.engine.model.device))
        self.history.append(("user", IMAGE_TOKEN * len(images) + ("\n" if images else "") + text))
        gen = dataclasses.replace(self.defaults, **generation)
        deltas = self._stream(gen)
        if stream:
            return deltas
        return "".join(deltas)

    def _stream(self, gen: GenerationConfig) -> Iterator[str]:
        ids = self._prompt()
        imgs = concat_images(self._images)
        tokens: list[int] = []
        emitted = ""
        try:
            if self.scheduler == "batch":
                tokens_in = self.engine.stream(ids, imgs, gen)
            else:
                tokens_in = self.engine.stream(ids, imgs, gen, prefix=self._prefix if self.reuse_prefix else None)
            for tok in tokens_in:
                tokens.append(tok)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = safe_text_length(text, gen.stop)
                if cut > len(emitted):
                    yield text[len(emitted) : cut]
                    emitted = text[:cut]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for s in gen.stop:  # a reply ends before its stop string
                if s in text:
                    text = text[: text.index(s)]
            if len(text) > len(emitted):
                yield text[len(emitted) :]
            emitted = text
        finally:
            self.history.append(("assistant", emitted))


def safe_text_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of incrementally decoded `text` may be emitted: not an unfinished character, not a
    stop string, and not a tail that could still grow into one."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":  # bytes of a character still incomplete
        n -= 1
    for s in stops:
        if s in text[:n]:
            n = text.index(s)
        for k in range(min(len(s) - 1, n), 0, -1):  # a suffix that is a prefix of the stop string
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return n
