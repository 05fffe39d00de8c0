"""det-1024 from an EVA-02 ViTDet detectron2 checkpoint (official Eagle: EVA-02-L
`eva02_L_coco_det_sys_o365.pth`).

  detectron2-vitdet  the detector's state (read_native picks `ema_state`, else `module`, else `model`):
                     the ViT is `backbone.net.*` with the names of EVA's ViTDet definition, which the
                     expert keeps: `patch_embed.proj`, `pos_embed` (1, 1 + 14*14, C),
                     `blocks.N.{norm1,norm2}`, `blocks.N.attn.{q_proj,k_proj,v_proj,q_bias,v_bias,proj}`,
                     `blocks.N.mlp.{w1,w2,ffn_ln,w3}`. Like Eagle (which keeps keys containing
                     `backbone.net.`, strips that prefix and drops every key containing `rope`), the
                     prefix becomes `vision_tower.`, and the RoPE tables (`rope_win.freqs_{cos,sin}`,
                     `rope_glb.*`, and the same buffers again under `blocks.N.attn.rope.*` in a
                     model state dict) are unused: the expert recomputes them from its config
                     (EvaViT.reset_rope after a meta-device build). The feature pyramid
                     (`backbone.simfp_*`), RPN, ROI heads and pixel statistics are unused.
"""

from __future__ import annotations

from eagle_fast.vision.weights.base import ExpertRules, Format

_PREFIX = "backbone.net."


def _from_vitdet(key: str) -> str | None:
    if not key.startswith(_PREFIX) or "rope" in key:
        return None
    return "vision_tower." + key[len(_PREFIX) :]


RULES = ExpertRules(
    formats=(Format("detectron2-vitdet", lambda keys: _PREFIX + "patch_embed.proj.weight" in keys, _from_vitdet),)
)
