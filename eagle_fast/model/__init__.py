"""The Eagle model: config, projector, splice and EagleLlamaForCausalLM, registered with
transformers' Auto classes on import (model_type "eagle_llama"), so official checkpoints load
through AutoModelForCausalLM once eagle_fast is imported."""

from transformers import AutoConfig, AutoModelForCausalLM

from eagle_fast.model.config import EagleLlamaConfig
from eagle_fast.model.eagle import EagleLlamaForCausalLM, EagleLlamaModel
from eagle_fast.model.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX

AutoConfig.register("eagle_llama", EagleLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(EagleLlamaConfig, EagleLlamaForCausalLM, exist_ok=True)

__all__ = ["EagleLlamaConfig", "EagleLlamaForCausalLM", "EagleLlamaModel", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX"]
