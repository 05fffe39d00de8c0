"""clip-448 from HF CLIP checkpoints (official Eagle: openai/clip-vit-large-patch14-336, a CLIPModel).

The expert holds a transformers CLIPVisionModel as `vision_tower.vision_model`; transformers 5 builds
that class flat (its own keys `embeddings.*`, `pre_layrnorm.*`, `encoder.*`, `post_layernorm.*`), so
the expert's keys are `vision_tower.vision_model.<those>`, the names Eagle's checkpoints carry.

  hf-clip          a CLIPModel (the official repo) or a CLIPVisionModel saved by transformers 4: keys
                   `vision_model.*` -> `vision_tower.vision_model.*`; the text tower (`text_model.*`),
                   `visual_projection`, `text_projection` and `logit_scale` are unused.
  hf-clip-vision   a CLIPVisionModel saved by transformers 5 (flat keys) -> `vision_tower.vision_model.*`.

`position_ids` buffers, stored by older checkpoints, are unused: the expert recomputes them.
"""

from __future__ import annotations

from eagle_fast.vision.weights.base import ExpertRules, Format

_FLAT = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _from_clip_model(key: str) -> str | None:
    if not key.startswith("vision_model.") or key.endswith(".position_ids"):
        return None
    return "vision_tower." + key


def _from_flat_vision_model(key: str) -> str | None:
    if not key.startswith(_FLAT) or key.endswith(".position_ids"):
        return None
    return "vision_tower.vision_model." + key


RULES = ExpertRules(
    formats=(
        Format("hf-clip", lambda keys: "vision_model.embeddings.patch_embedding.weight" in keys, _from_clip_model),
        Format("hf-clip-vision", lambda keys: "embeddings.patch_embedding.weight" in keys, _from_flat_vision_model),
    )
)
