"""EagleLlamaForCausalLM: a transformers LlamaForCausalLM with Eagle's vision mixture and projector.

State-dict layout exactly the official one: Llama keys (`model.layers.N...`, `lm_head`), the
projector under `model.mm_projector.*`, the experts under
`model.vision_tower.vision_towers.{k}.vision_tower.*`. Images enter as an EagleImageProcessor
output (`images=`); `input_ids` carry -200 where each image goes (see model/splice.py). Batches
whose samples hold no image skip the vision compute entirely.

    model = EagleLlamaForCausalLM(config)
    out = model(input_ids, attention_mask, labels=labels, images=processor(pil_images))
    new_tokens = model.generate(input_ids, images=processor(pil_images), max_new_tokens=64)
    with eagle_fast.ops.reference_ops():   # the same model on every op's pure-torch reference
        ref = model(input_ids, attention_mask, images=...)

In training mode with labels, the loss comes from `ops.linear_cross_entropy` on the final hidden
states (only learned positions go through the LM head) and the output's `logits` is None.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from eagle_fast.model.config import EagleLlamaConfig
from eagle_fast.model.projector import build_projector
from eagle_fast.model.splice import IMAGE_TOKEN_INDEX, count_images, splice
from eagle_fast.ops import linear_cross_entropy, reference_ops
from eagle_fast.ops.attention_hf import register_transformers_attention
from eagle_fast.vision.experts.convnext import ConvNextBlock
from eagle_fast.vision.experts.eva import EvaViT
from eagle_fast.vision.mixture import VisionMixture


class _EagleDefaults:
    """Hooks shared by the two model classes. Attention defaults to eagle_fast's op
    ("eagle_attention"; pass attn_implementation="sdpa" or "eager" to change it). transformers
    builds models on the meta device and then initializes, per module, what the checkpoint does not
    hold: here also the EVA RoPE tables (non-persistent buffers) and ConvNeXt's layer scales."""

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention is None:
            requested_attention = register_transformers_attention()
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EvaViT):
            module.reset_rope()
        elif isinstance(module, ConvNextBlock):
            module.reset_layer_scale()


class EagleLlamaModel(_EagleDefaults, LlamaModel):
    config_class = EagleLlamaConfig

    def __init__(self, config: EagleLlamaConfig):
        super().__init__(config)
        self.vision_tower = VisionMixture(config.mm_vision_tower, config.mm_grid, config.mm_expert_configs)
        if config.mm_hidden_size is None:
            config.mm_hidden_size = self.vision_tower.hidden_size
        elif config.mm_hidden_size != self.vision_tower.hidden_size:
            raise ValueError(
                f"mm_hidden_size {config.mm_hidden_size} does not match the experts of "
                f"{config.mm_vision_tower!r} ({self.vision_tower.hidden_size} channels)"
            )
        self.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        self.post_init()


class EagleLlamaForCausalLM(_EagleDefaults, LlamaForCausalLM):
    config_class = EagleLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer"]
    # buffers that older checkpoints (2024 Llama / CLIP exports) stored and that are now computed
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$", r"\.position_ids$"]

    def __init__(self, config: EagleLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = EagleLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ------------------------------------------------------------------ vision

    def save_pretrained(self, *args, save_original_format: bool = False, **kwargs):
        """Saves the module's own keys: its modules already carry the official checkpoint names. With
        transformers' default, renamings of sub-models (CLIP's legacy `vision_model.` prefix) are
        reverted or not depending on how the model was built — under ZeRO-3, giving
        `vision_model.vision_model.*` keys the official checkpoints do not have."""
        return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)

    def encode_images(self, images: dict[str, Any]) -> torch.Tensor:
        """Processor output for N images -> projected features (N, grid * grid, hidden)."""
        fused = self.model.vision_tower(images)
        weight = next(self.model.mm_projector.parameters(), None)  # none for "identity"
        return self.model.mm_projector(fused if weight is None else fused.to(weight.dtype))

    def splice_inputs(self, input_ids, attention_mask, labels, images):
        """Token ids with image placeholders (-200) -> the LLM's input embeddings with each image's
        projected features in place (a Splice: embeddings, mask, labels, positions), or None when
        there are no images. `images`: a processor output, or precomputed features (N, g*g, hidden)
        — what a generation engine with an encoder cache passes."""
        counts = count_images(input_ids, attention_mask)
        if sum(counts) == 0 and images is None:
            return None
        if isinstance(images, torch.Tensor):  # features already projected (an encoder cache's)
            features = list(images)
        else:
            features = list(self.encode_images(images)) if images is not None and _num_images(images) else []
        return splice(input_ids, attention_mask, labels, features, self.model.embed_tokens)

    # ------------------------------------------------------------------ forward / generate

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        images: dict[str, Any] | None = None,
        packed_seq_lens: torch.Tensor | None = None,
        reference: bool = False,
        **kwargs,
    ):
        """LlamaForCausalLM.forward plus `images` (an EagleImageProcessor output for the batch's
        images, in order of appearance), `packed_seq_lens` (one row holding several records of
        these token lengths: positions restart and attention stays within each record) and
        `reference=True` (every op on its pure-torch reference)."""
        if reference:
            with reference_ops():
                return self.forward(
                    input_ids, attention_mask, position_ids, inputs_embeds, labels, images, packed_seq_lens, **kwargs
                )
        row_lens = None
        if packed_seq_lens is not None:
            row_lens = self._packed_row_lengths(input_ids, packed_seq_lens)
        if (
            input_ids is not None
            and inputs_embeds is None
            and (images is not None or bool((input_ids == IMAGE_TOKEN_INDEX).any()))
        ):
            s = self.splice_inputs(input_ids, attention_mask if row_lens is None else None, labels, images)
            if s is not None:
                input_ids, inputs_embeds, attention_mask, position_ids, labels = (
                    None,
                    s.inputs_embeds,
                    s.attention_mask,
                    s.position_ids,
                    s.labels,
                )
        if row_lens is not None:
            ref = input_ids if input_ids is not None else inputs_embeds
            attention_mask, position_ids = self._packed(row_lens, ref.shape[1], ref.device, kwargs)
        if labels is not None and self.training and self._fused_loss_head() and not kwargs.get("logits_to_keep"):
            return self._forward_fused_loss(input_ids, attention_mask, position_ids, inputs_embeds, labels, kwargs)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )

    def _fused_loss_head(self) -> bool:
        """True when the LM head is a plain bias-free Linear holding its full (vocab, hidden) weight:
        not a DeepSpeed ZeRO-3 partition (shape [0] outside the module's own forward), a DTensor
        shard, an adapter wrapper or a quantized subclass. Otherwise the standard HF path runs."""
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            return False
        w = head.weight
        return type(w) in (torch.Tensor, nn.Parameter) and tuple(w.shape) == (head.out_features, head.in_features)

    def _forward_fused_loss(self, input_ids, attention_mask, position_ids, inputs_embeds, labels, kwargs):
        """LlamaForCausalLM.forward for training: the same base model call, then the loss from the final
        hidden states (B, T, H) and the lm_head weight (V, H) without the (B, T, V) logits."""
        base_kwargs = {k: v for k, v in kwargs.items() if k != "logits_to_keep"}  # a head argument in HF
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **base_kwargs,
        )
        hidden = outputs.last_hidden_state
        shift_labels = kwargs.get("shift_labels")  # HF: labels already shifted by the caller
        loss = linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            labels if shift_labels is None else shift_labels,
            num_items=kwargs.get("num_items_in_batch"),
            shift=shift_labels is None,
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _packed_row_lengths(self, input_ids, packed_seq_lens) -> list[int]:
        """Token lengths of the packed records -> their lengths after splicing (an image: grid^2 rows)."""
        if input_ids is not None and input_ids.shape[0] != 1:
            raise ValueError(f"packed_seq_lens: a packed batch is one row, got {input_ids.shape[0]}")
        lens = [int(n) for n in packed_seq_lens.tolist()]
        if input_ids is None:
            return lens
        rows, out, start = self.config.mm_grid**2, [], 0
        for n in lens:
            n_img = int((input_ids[0, start : start + n] == IMAGE_TOKEN_INDEX).sum())
            out.append(n - n_img + n_img * rows)
            start += n
        if start != input_ids.shape[1]:
            raise ValueError(f"packed_seq_lens sum to {start} tokens, the packed row has {input_ids.shape[1]}")
        return out

    def _packed(self, lens: list[int], total: int, device, kwargs):
        """Positions restarting per record, and attention kept within each record: varlen kwargs for
        eagle_fast's attention; for other implementations transformers derives the block mask from
        the restarting positions."""
        if sum(lens) != total:
            raise ValueError(f"packed records span {sum(lens)} rows, the packed row has {total}")
        position_ids = torch.cat([torch.arange(n, device=device) for n in lens])[None]
        kwargs.setdefault("use_cache", False)  # a packed row is a training batch; transformers only
        # derives per-record masks from restarting positions when no cache is built
        if self.config._attn_implementation != "eagle_attention":
            return None, position_ids
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
        return torch.ones((1, total), dtype=torch.long, device=device), position_ids

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        images: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF generation (KV cache, greedy, sampling). With image placeholders in `input_ids` the
        prompt is spliced first and generation runs from its embeddings; as with any
        `inputs_embeds` generation, the result then holds only the new tokens."""
        if input_ids is not None and (images is not None or (input_ids == IMAGE_TOKEN_INDEX).any()):
            s = self.splice_inputs(input_ids, attention_mask, None, images)
            return super().generate(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, **kwargs)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _num_images(images: dict[str, Any]) -> int:
    if "pixel_values" in images and images["pixel_values"] is not None:
        return images["pixel_values"].shape[0]
    for v in images.get("expert_inputs", {}).values():
        return (v["flattened_patches"] if isinstance(v, dict) else v).shape[0]
    return 0


# the real class replaces the stand-in registered at `import eagle_fast` (eagle_fast.model.auto)
AutoConfig.register("eagle_llama", EagleLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(EagleLlamaConfig, EagleLlamaForCausalLM, exist_ok=True)
