"""Attention backends behind `ops.dispatch`: each module says which inputs it supports and
why not (`supports`), and runs block-sparse attention over a block mask (`reference`:
PyTorch, defines the math; `cpu` and `cuda`: the compiled kernels; `flex`: FlexAttention)."""
