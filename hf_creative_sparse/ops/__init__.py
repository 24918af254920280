"""Sparse attention ops: block-mask prediction, sparse and block-sparse attention, the
SpargeAttn drop-in names, and the backend dispatcher."""

from .attention import block_sparse_attention, resolve_config, sparse_attention
from .dispatch import available_backends, register_backend
from .entmax import entmax_attention
from .masks import block_mask_to_lut, predict_block_mask
from .sparge import block_sparse_sage2_attn_cuda, spas_sage2_attn_meansim_cuda, spas_sage_attn_meansim_cuda

__all__ = [
    "available_backends",
    "block_mask_to_lut",
    "block_sparse_attention",
    "block_sparse_sage2_attn_cuda",
    "entmax_attention",
    "predict_block_mask",
    "register_backend",
    "resolve_config",
    "sparse_attention",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage_attn_meansim_cuda",
]
