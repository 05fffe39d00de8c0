"""pix2struct-1024 from an HF Pix2StructForConditionalGeneration checkpoint (official Eagle:
google/pix2struct-large, of which Eagle keeps `.encoder`).

  hf-pix2struct  `encoder.*` (a Pix2StructVisionModel: `embeddings.*`, `encoder.layer.*`,
                 `layernorm.weight`) -> `vision_tower.*`; the text decoder `decoder.*` is unused.
"""

from __future__ import annotations

from eagle_fast.vision.weights.base import ExpertRules, Format

_PREFIX = "encoder."


def _from_conditional_generation(key: str) -> str | None:
    return "vision_tower." + key[len(_PREFIX) :] if key.startswith(_PREFIX) else None


RULES = ExpertRules(
    formats=(
        Format(
            "hf-pix2struct",
            lambda keys: _PREFIX + "embeddings.patch_projection.weight" in keys,
            _from_conditional_generation,
        ),
    )
)
