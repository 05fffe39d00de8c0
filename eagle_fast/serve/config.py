"""ServeConfig: everything the server can be told, as one dataclass (each field is a CLI flag)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from eagle_fast.images import DEFAULT_MAX_PIXELS
from eagle_fast.inference.engine import GenerationConfig


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    model: str = field(metadata={"help": "a checkpoint directory or a preset name, as load_model takes"})
    model_name: str | None = _opt(None, "the model id clients see (default: the path's last component)")
    host: str = _opt("127.0.0.1", "address to bind; loopback unless asked, the API has no rate limiting")
    port: int = _opt(8000, "port to bind")
    api_key: str | None = _opt(
        None,
        "require `Authorization: Bearer KEY` on the API (default: "
        "$EAGLE_FAST_API_KEY, which keeps the key out of the process list)",
    )
    template: str = _opt("vicuna_v1", "chat template: vicuna_v1, llama3, chatml, plain, hf")
    scheduler: str = _opt(
        "batch",
        "batch: continuous batching (one engine step over every running request); "
        "sequential: one generation per slot, --parallel slots (the comparison path)",
    )
    parallel: int = _opt(1, "sequential scheduler: generations at once; under batch, an alias of --max_num_seqs")
    max_num_seqs: int = _opt(16, "batch scheduler: requests generating at once")
    max_batched_tokens: int = _opt(512, "batch scheduler: rows per engine step (decode rows + prefill chunks)")
    kv_cache_bytes: int | None = _opt(
        None, "batch scheduler: KV cache budget in bytes (default 1 GiB, at least one full context)"
    )
    encoder_cache_bytes: int = _opt(256 << 20, "batch scheduler: image feature cache in bytes")
    max_queue: int = _opt(256, "requests waiting for a slot; beyond, HTTP 429")
    dtype: str = _opt("auto", "model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    device: str = _opt("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    context_length: int | None = _opt(None, "context in tokens (default: the model's max_position_embeddings)")
    # defaults for requests that do not say: the generation defaults (the original's chat settings)
    max_tokens: int = _opt(
        GenerationConfig.max_new_tokens, "default max_tokens, clipped to what the prompt leaves of the context"
    )
    temperature: float = _opt(GenerationConfig.temperature, "default temperature (0: greedy)")
    top_p: float = _opt(GenerationConfig.top_p, "default top_p")
    # limits on untrusted input
    max_body_bytes: int = _opt(48 << 20, "largest request body (413 beyond)")
    max_images: int = _opt(8, "images per request, all messages together")
    max_image_bytes: int = _opt(16 << 20, "largest encoded image (413 beyond)")
    max_image_pixels: int = _opt(DEFAULT_MAX_PIXELS, "largest width x height, read from the header before decoding")
    max_stop: int = _opt(8, "stop strings per request")
    allow_remote_images: bool = _opt(False, "fetch http(s) image URLs (default: only data: URLs)")
    remote_timeout_s: float = _opt(10.0, "timeout of one remote image fetch")
    log_level: str = _opt("info", "uvicorn log level")

    def served_name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model)) or self.model

    def validate(self) -> "ServeConfig":
        if not self.model:
            raise ValueError("model is required: a checkpoint directory or a preset name")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.scheduler not in ("batch", "sequential"):
            raise ValueError(f"scheduler must be batch or sequential, got {self.scheduler!r}")
        for name in ("max_num_seqs", "max_batched_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 1 or self.max_images < 0:
            raise ValueError("max_tokens must be >= 1 and max_images >= 0")
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        return self
