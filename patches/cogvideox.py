"""CogVideoX: joint text-video self-attention, text first.

diffusers 0.42 (`attention_processor.CogVideoXAttnProcessor2_0`): the text tokens
(``max_text_seq_length``, 226 by default) are concatenated *before* the video tokens,
q/k/v are projected and LayerNorm-ed per head, RoPE is applied to the video part of q and
k only, and torch SDPA is called directly on (B, H, S, D). The replacement below repeats
that math line for line and replaces only the SDPA call; the text prefix is kept dense.
The fused-projection variant (`FusedCogVideoXAttnProcessor2_0`, after
``fuse_qkv_projections()``) is handled the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_creative_sparse.integrations.registry import AttentionProcessorPatch, SparseProcessor, processor_kind, register_patch

_PROCESSORS = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")


_MODULE = "diffusers.models.attention_processor"  # where the replaced processor class is defined

class SparseCogVideoXAttnProcessor(SparseProcessor):
    """CogVideoXAttnProcessor2_0 with the attention call routed through `LayerState`."""

    def __init__(self, state: Any, original: Any, *, fused: bool) -> None:
        super().__init__(state, original)
        self.fused = fused

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:  # CogVideoX never passes one; keep the exact original path
            return self.fallback("attention mask", attn, hidden_states, encoder_hidden_states,
                                 attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        text_seq_length = encoder_hidden_states.size(1)

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        batch_size, sequence_length, _ = hidden_states.shape

        if self.fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = torch.split(qkv, split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = self.state.attend(query, key, value, layout="HND", dense_prefix=text_seq_length)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


@register_patch
class CogVideoXPatch(AttentionProcessorPatch):
    """Every CogVideoX block's joint attention (``transformer_blocks.<i>.attn1``)."""

    family = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)

    def make_processor(self, name: str, module: torch.nn.Module) -> SparseCogVideoXAttnProcessor | None:
        kind = processor_kind(module.processor, _PROCESSORS, _MODULE)
        if kind is None:
            return None
        return SparseCogVideoXAttnProcessor(self.make_state(name), module.processor,
                                            fused=kind == "FusedCogVideoXAttnProcessor2_0")
