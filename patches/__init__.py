"""Model-family patches (installed as hf_creative_sparse.patches). Each module registers a
`ModelPatch` with `hf_creative_sparse.integrations.registry.register_patch` on import."""
