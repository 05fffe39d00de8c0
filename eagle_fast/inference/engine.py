"""Generation engine: prefill once (experts + splice + prompt), then decode token by token with the
KV cache, as a generator of token ids. Sampling uses transformers' logits processors
(temperature, top-k, top-p, repetition penalty); greedy when temperature is 0 or do_sample is
False; stops on stop ids (EOS by default), stop strings, or max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from eagle_fast.model.splice import IMAGE_TOKEN_INDEX


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.2  # the original's defaults (vicuna_v1 demos): 0.2 / 0.5
    top_p: float = 0.5
    top_k: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool | None = None  # None: sample when temperature > 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS
    seed: int | None = None

    def sampling(self) -> bool:
        return self.temperature > 0 if self.do_sample is None else self.do_sample


def _processors(gen: GenerationConfig):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
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


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    context_length: int | None = None  # None: the model's max_position_embeddings
    _rng: torch.Generator = field(default_factory=torch.Generator, repr=False)

    def _context(self) -> int:
        return self.context_length or int(getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.no_grad()
    def prefill(self, input_ids: list[int], images: dict[str, Any] | None):
        """Runs the prompt once; returns (last logits (1, V), cache, prompt rows)."""
        ids = torch.tensor([input_ids], device=self.model.device)
        n_img = int((ids == IMAGE_TOKEN_INDEX).sum())
        if n_img:
            s = self.model._splice_inputs(ids, None, None, images)
            out = self.model(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, use_cache=True)
            rows = s.inputs_embeds.shape[1]
        else:
            out = self.model(input_ids=ids, use_cache=True)
            rows = ids.shape[1]
        return out.logits[:, -1], out.cache, rows

    @torch.no_grad()
    def stream(self, input_ids: list[int], images: dict[str, Any] | None = None,
               gen: GenerationConfig | None = None) -> Iterator[int]:
        """Yields the new token ids one by one (a stop id ends the stream and is not yielded)."""
        gen = gen or GenerationConfig()
        logits, cache, rows = self.prefill(input_ids, images)
        if rows + gen.max_new_tokens > self._context():
            raise ValueError(f"prompt of {rows} rows (images included) + max_new_tokens {gen.max_new_tokens} exceeds "
                             f"the context of {self._context()}; shorten the history or max_new_tokens")
        stop_ids = set(gen.stop_ids if gen.stop_ids is not None else [self.tokenizer.eos_token_id])
        procs = _processors(gen)
        if gen.seed is not None:
            self._rng.manual_seed(gen.seed)
        seen = torch.tensor([[t for t in input_ids if t >= 0]], device=logits.device)
        text_ids: list[int] = []
        for _ in range(gen.max_new_tokens):
            scores = procs(seen, logits.float())
            if gen.sampling():
                probs = torch.softmax(scores, -1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=self._rng)[0, 0])
            else:
                token = int(scores.argmax(-1)[0])
            if token in stop_ids:
                return
            yield token
            text_ids.append(token)
            if gen.stop and any(s in self.tokenizer.decode(text_ids) for s in gen.stop):
                return
            seen = torch.cat([seen, seen.new_tensor([[token]])], 1)
            out = self.model(input_ids=seen.new_tensor([[token]]), cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.cache
