"""Building transformers modules for the experts: from configs only, on eagle_fast's attention."""

from __future__ import annotations


def hf_attention(config):
    """The config, set to run attention on `ops.attention` (attn_implementation="eagle_attention")."""
    from eagle_fast.ops.attention_hf import register_transformers_attention

    config._attn_implementation = register_transformers_attention()
    return config
