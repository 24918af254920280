"""Flux: double-stream and single-stream blocks, text first.

diffusers 0.42 (`transformer_flux.FluxAttnProcessor`): q/k/v come from
``_get_qkv_projections`` (fused or not), are unflattened to (B, S, H, D) by
``attn.head_dim``, RMS-normed per head; in double-stream blocks the text projections
(``add_*_proj``, ``norm_added_*``) are concatenated *before* the image tokens; RoPE
covers the whole joint sequence; attention goes through ``dispatch_attention_fn`` on
(B, S, H, D). The replacement repeats that and replaces only the attention call.

Single-stream blocks receive the already concatenated [text, image] sequence with
``encoder_hidden_states=None``, so the processor cannot see the text length. The patch
reads it from the transformer's own call: a forward pre-hook records
``encoder_hidden_states.shape[1]`` (the context embedder keeps the length), and every
single-stream processor keeps that many leading tokens dense. A processor called outside
the transformer's forward (no recorded length) hands the call to the original processor.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from hf_creative_sparse.integrations.registry import AttentionProcessorPatch, SparseProcessor, processor_kind, register_patch


_MODULE = "diffusers.models.transformers.transformer_flux"  # where the replaced processor class is defined

class _TextLength:
    """The text length of the transformer call in progress (None outside a call)."""

    def __init__(self) -> None:
        self.value: int | None = None


class SparseFluxAttnProcessor(SparseProcessor):
    """FluxAttnProcessor with the attention call routed through `LayerState`."""

    def __init__(self, state: Any, original: Any, text_length: _TextLength) -> None:
        super().__init__(state, original)
        self.text_length = text_length

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            return self.fallback("attention mask", *args)
        if self._parallel_config is not None:
            return self.fallback("context parallel", *args)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_len = encoder_hidden_states.shape[1]  # double-stream: text is joined below
        elif encoder_hidden_states is None:
            text_len = self.text_length.value  # single-stream: text already at the front
            if text_len is None or text_len > hidden_states.shape[1]:
                return self.fallback("text length unknown", *args)
        else:
            return self.fallback("unexpected layout", *args)

        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.state.attend(query, key, value, layout="NHD", dense_prefix=text_len)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


@register_patch
class FluxPatch(AttentionProcessorPatch):
    """Every FluxAttnProcessor: ``transformer_blocks.<i>.attn`` (double-stream) and
    ``single_transformer_blocks.<i>.attn`` (single-stream). IP-Adapter processors are left
    alone."""

    family = "flux"
    model_classes = ("FluxTransformer2DModel",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text_length = _TextLength()
        params = list(inspect.signature(type(self.model).forward).parameters)[1:]  # without self
        self._ehs_index = params.index("encoder_hidden_states") if "encoder_hidden_states" in params else None

    def _capture_text_length(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and self._ehs_index is not None and len(args) > self._ehs_index:
            ehs = args[self._ehs_index]
        self.text_length.value = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else None

    def _forget_text_length(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.text_length.value = None

    def install(self) -> None:
        self.add_forward_pre_hook(self.model, self._capture_text_length)
        self.add_forward_hook(self.model, self._forget_text_length)
        super().install()

    def make_processor(self, name: str, module: torch.nn.Module) -> SparseFluxAttnProcessor | None:
        if processor_kind(module.processor, ("FluxAttnProcessor",), _MODULE) is None:
            return None
        return SparseFluxAttnProcessor(self.make_state(name), module.processor, self.text_length)
