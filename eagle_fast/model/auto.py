"""Registering "eagle_llama" with transformers' Auto classes without importing the model.

AutoConfig gets the config class itself (a light module). AutoModelForCausalLM gets a stand-in that
carries the config class and forwards from_pretrained / from_config to EagleLlamaForCausalLM,
imported on that first call: `import eagle_fast` (or any of its layers) then costs no model import,
and `AutoModelForCausalLM.from_pretrained(official_checkpoint)` still returns an
EagleLlamaForCausalLM.
"""

from __future__ import annotations

from typing import Any

from eagle_fast.model.config import EagleLlamaConfig


def _model_class():
    from eagle_fast.model.eagle import EagleLlamaForCausalLM

    return EagleLlamaForCausalLM


class LazyEagleLlamaForCausalLM:
    """EagleLlamaForCausalLM for transformers' Auto mapping, resolved on first use."""

    config_class = EagleLlamaConfig

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return _model_class().from_pretrained(*args, **kwargs)

    @classmethod
    def from_config(cls, *args: Any, **kwargs: Any):
        return _model_class()._from_config(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args: Any, **kwargs: Any):
        return _model_class()._from_config(*args, **kwargs)


def register() -> None:
    """Idempotent. Once the real class is imported it registers itself (eagle_fast.model.eagle)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("eagle_llama", EagleLlamaConfig, exist_ok=True)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if EagleLlamaConfig not in MODEL_FOR_CAUSAL_LM_MAPPING._extra_content:
        AutoModelForCausalLM.register(EagleLlamaConfig, LazyEagleLlamaForCausalLM, exist_ok=True)
