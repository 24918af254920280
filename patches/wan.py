"""Wan (2.1 / 2.2): video self-attention ``attn1`` only; text cross-attention untouched.

diffusers 0.42 (`transformer_wan.WanAttnProcessor`): for self-attention
(``encoder_hidden_states=None``) q/k/v come from ``_get_qkv_projections`` (fused or not),
are RMS-normed across heads *before* the head split, unflattened to (B, S, H, D), rotated
by Wan's interleaved RoPE, and attended through ``dispatch_attention_fn``. The
replacement repeats that and replaces only the attention call. ``attn2`` (cross-attention
to the text, and the image context of I2V models) keeps diffusers' processor: its keys
are a few hundred text tokens, where sparsity cannot pay. There are no text tokens in
``attn1``, so nothing is forced dense.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_creative_sparse.integrations.registry import AttentionProcessorPatch, SparseProcessor, processor_kind, register_patch


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE, as in WanAttnProcessor.__call__ (pairs (2i, 2i+1) rotated)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


_MODULE = "diffusers.models.transformers.transformer_wan"  # where the replaced processor class is defined

class SparseWanSelfAttnProcessor(SparseProcessor):
    """WanAttnProcessor for self-attention with the attention call routed through `LayerState`."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None:
            return self.fallback("cross attention", *args)
        if attention_mask is not None:
            return self.fallback("attention mask", *args)
        if self._parallel_config is not None:
            return self.fallback("context parallel", *args)

        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        hidden_states = self.state.attend(query, key, value, layout="NHD")
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


@register_patch
class WanPatch(AttentionProcessorPatch):
    """``blocks.<i>.attn1`` of WanTransformer3DModel (and of the VACE variant, whose
    blocks use the same processor)."""

    family = "wan"
    model_classes = ("WanTransformer3DModel", "WanVACETransformer3DModel")

    def make_processor(self, name: str, module: torch.nn.Module) -> SparseWanSelfAttnProcessor | None:
        if processor_kind(module.processor, ("WanAttnProcessor",), _MODULE) is None:
            return None
        if getattr(module, "is_cross_attention", True) or getattr(module, "add_k_proj", None) is not None:
            return None
        return SparseWanSelfAttnProcessor(self.make_state(name), module.processor)
