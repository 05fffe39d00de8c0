"""sam-1024 from an HF SamModel checkpoint (official Eagle: facebook/sam-vit-large).

  hf-sam   `vision_encoder.*` -> `vision_tower.*`, except the pretrained neck `vision_encoder.neck.*`,
           which is never loaded: Eagle replaces SAM's neck by a new 1x1 conv + LayerNorm (`neck.conv1`,
           `neck.layer_norm1`) that is trained from scratch, although its names and shapes coincide
           with the first half of the pretrained neck. The prompt encoder, mask decoder and shared
           image embedding are unused.

The expert's neck keys are therefore always `new`.
"""

from __future__ import annotations

from eagle_fast.vision.weights.base import ExpertRules, Format

_PREFIX = "vision_encoder."


def _from_sam_model(key: str) -> str | None:
    if not key.startswith(_PREFIX) or key.startswith(_PREFIX + "neck."):
        return None
    return "vision_tower." + key[len(_PREFIX) :]


RULES = ExpertRules(
    formats=(Format("hf-sam", lambda keys: _PREFIX + "patch_embed.projection.weight" in keys, _from_sam_model),),
    never_load=("vision_tower.neck.",),
)
