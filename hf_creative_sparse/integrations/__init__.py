"""Putting the ops into models: the registry of model-family patches (`registry`), the
per-layer runtime state every patched layer owns (`state`) with its options and step
clock (`options`), the one-liner
(`enable.enable_creative_sparse`), the transformers ``attn_implementation`` hook
(`transformers_hook`), the diffusers attention backend (`diffusers_backend`) with its
Ulysses context parallelism (`context_parallel`), and KV retention for diffusion LMs
(`retention`).

Nothing is imported here: ``import hf_creative_sparse`` installs the transformers hook from
this package and must not pull torch in.
"""
