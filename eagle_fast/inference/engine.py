"""Generation engine: prefill once (experts + splice + prompt), then decode token by token with the
KV cache, as a generator of token ids. Sampling uses transformers' logits processors
(temperature, top-k, top-p, repetition penalty); greedy when temperature is 0 or do_sample is
False; stops on stop ids (EOS by default), stop strings, or max_new_tokens.

Prefix reuse: pass a `KVPrefix` to `stream` and it keeps the conversation's KV cache and what it
holds (text ids, and a content digest per image). The next call feeds only what follows the
longest common prefix: in a multi-turn chat the images and earlier turns are neither re-encoded
nor re-prefilled. Any change (an edited turn, another image) invalidates from that point on.

`generate_batch` runs several prompts at once, left-padded, with the same results as one by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from eagle_fast.constants import IMAGE_TOKEN_INDEX
from eagle_fast.data.collate import concat_images, select_images, to_device


def _gen(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class GenerationConfig:
    """How to generate: the one source of the generation defaults (the chat API and CLI, the server,
    eval). The defaults are the original Eagle / LLaVA chat's: 512 new tokens, temperature 0.2,
    top_p 0.5."""

    max_new_tokens: int = _gen(512, "most tokens to generate")
    temperature: float = _gen(0.2, "sampling temperature (0: greedy)")
    top_p: float = _gen(0.5, "nucleus sampling: keep the most likely tokens up to this probability mass")
    top_k: int = _gen(0, "keep only the k most likely tokens (0: all)")
    repetition_penalty: float = _gen(1.0, "penalty on tokens already in the text (1: none)")
    do_sample: bool | None = _gen(None, "sample (true) or greedy (false); default: sample when temperature > 0")
    stop: tuple[str, ...] = _gen((), "stop strings (default: the chat template's own)")
    stop_ids: tuple[int, ...] | None = _gen(None, "stop token ids (default: the tokenizer's EOS)")
    seed: int | None = _gen(None, "sampling seed (default: nondeterministic)")
    # vLLM's names and meaning: EOS (the default stop id) does not end the reply; stop ids cannot be
    # drawn before min_new_tokens tokens (stop strings still end a reply at any length)
    ignore_eos: bool = _gen(False, "keep generating past EOS (explicit stop_ids still stop)")
    min_new_tokens: int = _gen(0, "tokens generated before a stop id may be")

    def sampling(self) -> bool:
        return self.temperature > 0 if self.do_sample is None else self.do_sample

    def stop_id_set(self, tokenizer) -> set[int]:
        """The ids that end a reply: stop_ids, else the tokenizer's EOS (none with ignore_eos)."""
        if self.stop_ids is not None:
            return set(self.stop_ids)
        return set() if self.ignore_eos or tokenizer.eos_token_id is None else {tokenizer.eos_token_id}


@dataclass
class KVPrefix:
    """A conversation's KV cache and the units it holds, one per input: a text id, or ("image",
    digest) for an image (grid^2 cache rows)."""

    units: list = field(default_factory=list)
    cache: Any = None

    def clear(self) -> None:
        self.units, self.cache = [], None


def _processors(gen: GenerationConfig, prompt_len: int = 0, stop_ids: set[int] = frozenset()):
    """transformers' logits processors for `gen`; they see (1, prompt_len + generated) text ids."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if gen.min_new_tokens > 0 and stop_ids:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, gen.min_new_tokens, sorted(stop_ids)))
    if gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.sampling():
        if gen.temperature > 0 and gen.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k:
            procs.append(TopKLogitsWarper(gen.top_k))
        if 0 < gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs


def image_digests(images: dict[str, Any] | None) -> list[str]:
    """One content digest per image of a processor output: the processor's own (of the decoded
    image's host bytes), else one of its pixels as every expert sees them (a device-to-host copy)."""
    if images is None:
        return []
    if "image_digests" in images:
        return list(images["image_digests"])
    tensors = [images["pixel_values"]]
    for v in images.get("expert_inputs", {}).values():
        tensors += list(v.values()) if isinstance(v, dict) else [v]
    out = []
    for i in range(images["pixel_values"].shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            h.update(t[i].detach().cpu().contiguous().numpy().tobytes())
        out.append(h.hexdigest())
    return out


class _Stopper:
    """Stop-string check over the tail of the generated text: only the last tokens that can hold a
    stop string are decoded each step (a character may take up to 4 byte tokens)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4

    def hit(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :])
        return any(s in tail for s in self.stops)


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    context_length: int | None = None  # None: the model's max_position_embeddings

    def _context(self) -> int:
        return self.context_length or int(getattr(self.model.config, "max_position_embeddings", 2048))

    def _rows(self, units: list) -> int:
        grid2 = int(getattr(self.model.config, "mm_grid", 0)) ** 2
        return sum(grid2 if isinstance(u, tuple) else 1 for u in units)

    def _check_context(self, rows: int, gen: GenerationConfig, what: str = "prompt") -> None:
        if rows + gen.max_new_tokens > self._context():
            raise ValueError(
                f"{what} of {rows} rows (images included) + max_new_tokens {gen.max_new_tokens} exceeds "
                f"the context of {self._context()}; shorten the history or max_new_tokens"
            )

    @torch.no_grad()
    def prefill(self, input_ids: list[int], images: dict[str, Any] | None, prefix: KVPrefix | None = None):
        """Runs the part of the prompt the prefix does not hold; returns (last logits (1, V), cache).
        With a prefix, it is left holding the whole prompt. Only the last row goes through the LM
        head (a (rows, vocab) logits block would cost more than the layers on a small LLM)."""
        digests = iter(image_digests(images))
        images = to_device(images, self.model.device)  # processor outputs may live on the host
        units = [("image", next(digests)) if t == IMAGE_TOKEN_INDEX else t for t in input_ids]
        prefix = prefix if prefix is not None else KVPrefix()
        keep = 0
        if prefix.cache is not None:
            while keep < min(len(units) - 1, len(prefix.units)) and units[keep] == prefix.units[keep]:
                keep += 1  # at least one unit is fed: its logits start the reply
        cache = prefix.cache if keep else None
        if cache is not None:
            cache.crop(-(cache.get_seq_length() - self._rows(units[:keep])))
        prefix.clear()  # until the forward below completes, the cache is in no known state
        ids = torch.tensor([input_ids[keep:]], device=self.model.device)
        first_img = sum(1 for t in input_ids[:keep] if t == IMAGE_TOKEN_INDEX)
        n_img = int((ids == IMAGE_TOKEN_INDEX).sum())
        if n_img:
            feats = select_images(images, list(range(first_img, first_img + n_img)))
            s = self.model.splice_inputs(ids, None, None, feats)
            out = self.model(inputs_embeds=s.inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefix.units, prefix.cache = units, out.cache
        return out.logits[:, -1], out.cache

    @torch.no_grad()
    def stream(
        self,
        input_ids: list[int],
        images: dict[str, Any] | None = None,
        gen: GenerationConfig | None = None,
        prefix: KVPrefix | None = None,
    ) -> Iterator[int]:
        """Yields the new token ids one by one (a stop id ends the stream and is not yielded).
        `prefix`: reuse (and keep up to date) a conversation's KV cache."""
        gen = gen or GenerationConfig()
        n_img = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
        self._check_context(len(input_ids) - n_img + n_img * int(getattr(self.model.config, "mm_grid", 0)) ** 2, gen)
        prefix = prefix if prefix is not None else KVPrefix()
        logits, cache = self.prefill(input_ids, images, prefix)
        stop_ids = gen.stop_id_set(self.tokenizer)
        seen = torch.tensor([[t for t in input_ids if t >= 0]], device=logits.device)
        procs, stopper = _processors(gen, seen.shape[1], stop_ids), _Stopper(self.tokenizer, gen.stop)
        rng = torch.Generator()
        rng.manual_seed(gen.seed if gen.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        text_ids: list[int] = []
        for _ in range(gen.max_new_tokens):
            token = self._pick(procs(seen, logits.float()), gen, rng)[0]
            if token in stop_ids:
                return
            yield token
            text_ids.append(token)
            if stopper.hit(text_ids) or len(text_ids) == gen.max_new_tokens:
                return
            seen = torch.cat([seen, seen.new_tensor([[token]])], 1)
            units = prefix.units + [token]
            prefix.clear()
            out = self.model(input_ids=seen.new_tensor([[token]]), cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.cache
            prefix.units, prefix.cache = units, cache

    @staticmethod
    def _pick(scores: torch.Tensor, gen: GenerationConfig, rng: torch.Generator) -> list[int]:
        """(B, V) processed scores -> one token per row."""
        if gen.sampling():
            return torch.multinomial(torch.softmax(scores, -1).cpu(), 1, generator=rng)[:, 0].tolist()
        return scores.argmax(-1).tolist()

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: list[list[int]],
        images: list[dict[str, Any] | None] | None = None,
        gen: GenerationConfig | None = None,
    ) -> list[list[int]]:
        """Several prompts at once (each with its own processor output or None), left-padded; returns
        each prompt's new token ids. Greedy results equal `stream`'s one prompt at a time (sampling
        draws from one generator for the whole batch)."""
        gen = gen or GenerationConfig()
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"generate_batch: {len(prompts)} prompts but {len(images)} image entries")
        grid2 = int(getattr(self.model.config, "mm_grid", 0)) ** 2
        for i, p in enumerate(prompts):
            n_img = sum(1 for t in p if t == IMAGE_TOKEN_INDEX)
            self._check_context(len(p) - n_img + n_img * grid2, gen, what=f"prompt {i}")
        dev, b, width = self.model.device, len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, width), pad, dtype=torch.long, device=dev)
        mask = torch.zeros((b, width), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, device=dev)
            mask[i, width - len(p) :] = 1
        imgs = to_device(concat_images([im for im in images if im is not None]), dev)
        if (ids == IMAGE_TOKEN_INDEX).any():
            s = self.model.splice_inputs(ids, mask, None, imgs)
            mask, pos = s.attention_mask, s.position_ids
            out = self.model(
                inputs_embeds=s.inputs_embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
            )
        else:
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        logits, cache, pos = out.logits[:, -1], out.cache, pos[:, -1:]
        stop_ids = gen.stop_id_set(self.tokenizer)
        seen = [torch.tensor([[t for t in p if t >= 0]], device=dev) for p in prompts]
        procs = [_processors(gen, s.shape[1], stop_ids) for s in seen]
        stopper = _Stopper(self.tokenizer, gen.stop)
        rng = torch.Generator()
        rng.manual_seed(gen.seed if gen.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        results: list[list[int]] = [[] for _ in prompts]
        done = [False] * b
        for _ in range(gen.max_new_tokens):
            # processors per row: a repetition penalty must not see another row's padding
            scores = torch.cat([procs[i](seen[i], logits[i : i + 1].float()) for i in range(b)])
            tokens = self._pick(scores, gen, rng)
            for i, tok in enumerate(tokens):
                if done[i]:
                    continue
                if tok in stop_ids:
                    done[i] = True
                    continue
                results[i].append(tok)
                seen[i] = torch.cat([seen[i], seen[i].new_tensor([[tok]])], 1)
                done[i] = stopper.hit(results[i]) or len(results[i]) == gen.max_new_tokens
            if all(done):
                break
            feed = torch.tensor([[pad if done[i] else tokens[i]] for i in range(b)], device=dev)
            mask = torch.cat([mask, mask.new_ones((b, 1))], 1)
            pos = pos + 1
            out = self.model(input_ids=feed, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.cache
        return results
