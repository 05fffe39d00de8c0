"""convnext-1024 from timm or open_clip ConvNeXt checkpoints (official Eagle: ConvNeXt-XXLarge, timm's
`convnext_xxlarge.clip_laion2b_soup_ft_in1k`, the default weights of Eagle's `convnext_xxlarge`).

  timm-convnext       timm's layout: `stem.{0,1}`, `stages.N.downsample.{0,1}`,
                      `stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`, `head.norm`, `head.fc`.
                      Block layer scales `gamma` -> `weight` (Eagle's copy of timm's ConvNeXt, and its
                      checkpoint filter, name them so); everything else keeps its name under
                      `vision_tower.`. `norm_pre.*` (timm's head-norm-first variants) is unused: Eagle
                      runs the stem and stages only.
  open-clip-convnext  open_clip's image tower (`open_clip_pytorch_model.bin` of the LAION ConvNeXt CLIP
                      repos): `visual.trunk.<timm key>` as above; the CLIP projection `visual.head.*` and
                      the text tower are unused.

The classifier head (`head.*`) is never run: it may stay new, or come with another class count
(reported as mismatched); head keys the expert lacks (e.g. an MLP head's `head.pre_logits.*`) are unused.
"""

from __future__ import annotations

import re

from eagle_fast.vision.weights.base import ExpertRules, Format

_LAYER_SCALE = re.compile(r"^stages\.\d+\.blocks\.\d+\.gamma$")
_OPEN_CLIP = "visual.trunk."


def _from_timm(key: str) -> str | None:
    if not key.startswith(("stem.", "stages.", "head.")):
        return None  # norm_pre.* and anything outside the network Eagle runs
    if _LAYER_SCALE.match(key):
        key = key[: -len("gamma")] + "weight"
    return "vision_tower." + key


def _from_open_clip(key: str) -> str | None:
    return _from_timm(key[len(_OPEN_CLIP) :]) if key.startswith(_OPEN_CLIP) else None


RULES = ExpertRules(
    formats=(
        Format("timm-convnext", lambda keys: "stem.0.weight" in keys, _from_timm),
        Format("open-clip-convnext", lambda keys: _OPEN_CLIP + "stem.0.weight" in keys, _from_open_clip),
    ),
    optional=("vision_tower.head.",),
)
