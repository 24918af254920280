"""HunyuanVideo: joint attention with the video first and the text last.

diffusers 0.42 (`transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0`): in
single-stream blocks (no ``add_q_proj``) the text is concatenated *after* the video
before the projections; q/k/v are unflattened to (B, S, H, D) and RMS-normed per head;
RoPE covers the video part only; in double-stream blocks the text projections are
appended after the video; attention goes through ``dispatch_attention_fn`` with the
transformer's bool mask [B, 1, 1, S] that hides padded text keys. The replacement repeats
that, passes the mask as a key padding mask (padded text keys are never attended, at
any sparsity) and keeps the text suffix dense. The token refiner's plain
``AttnProcessor2_0`` is left alone (it attends over the text only).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_creative_sparse.integrations.registry import AttentionProcessorPatch, SparseProcessor, processor_kind, register_patch

_MODULE = "diffusers.models.transformers.transformer_hunyuan_video"  # where the replaced processor class is defined


def _key_padding_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> tuple[bool, torch.Tensor | None]:
    """(usable, bool [B, S] True = attend) from HunyuanVideo's mask; a mask of another form
    (float, per-query) is not usable by the sparse path."""
    if attention_mask is None:
        return True, None
    if attention_mask.dtype != torch.bool:
        return False, None
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        mask = attention_mask[:, 0, 0, :]
    elif attention_mask.dim() == 2:
        mask = attention_mask
    else:
        return False, None
    if tuple(mask.shape) != (batch, seq_len) and not (mask.shape[0] == 1 and mask.shape[1] == seq_len):
        return False, None
    return True, mask.expand(batch, seq_len)


class SparseHunyuanVideoAttnProcessor(SparseProcessor):
    """HunyuanVideoAttnProcessor2_0 with the attention call routed through `LayerState`."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if self._parallel_config is not None:
            return self.fallback("context parallel", *args)
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        batch = hidden_states.shape[0]
        usable, key_padding_mask = _key_padding_mask(attention_mask, batch, hidden_states.shape[1] + text_len)
        if not usable:
            return self.fallback("attention mask form", *args)

        from diffusers.models.embeddings import apply_rotary_emb

        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # 2. QK normalization
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. Rotational positional embeddings applied to latent stream (not to a joined text tail)
        if image_rotary_emb is not None:
            tail = text_len if attn.add_q_proj is None else 0

            def rotate(x: torch.Tensor) -> torch.Tensor:
                if not tail:
                    return apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)
                return torch.cat([apply_rotary_emb(x[:, :-tail], image_rotary_emb, sequence_dim=1), x[:, -tail:]], dim=1)

            query, key = rotate(query), rotate(key)

        # 4. Encoder condition QKV projection and normalization
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention (the only change: sparse, text suffix dense, padded keys masked)
        hidden_states = self.state.attend(query, key, value, layout="NHD", dense_suffix=text_len,
                                          key_padding_mask=key_padding_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


@register_patch
class HunyuanVideoPatch(AttentionProcessorPatch):
    """``transformer_blocks.<i>.attn`` and ``single_transformer_blocks.<i>.attn`` (and the
    token-replace blocks of the I2V model)."""

    family = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)

    def make_processor(self, name: str, module: torch.nn.Module) -> SparseHunyuanVideoAttnProcessor | None:
        if processor_kind(module.processor, ("HunyuanVideoAttnProcessor2_0",), _MODULE) is None:
            return None
        return SparseHunyuanVideoAttnProcessor(self.make_state(name), module.processor)
