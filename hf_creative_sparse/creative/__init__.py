"""Creative control: the control manifold M(s) and the dial (`control`), the logits
processor for transformers' ``generate`` (`processor`), the draft-pick-refine wrapper
(`wrapper`), decoding constraints (`constraints`), K(s) for mixture-of-experts routers
(`moe`), the dial over the denoising steps of diffusion LMs (`diffusion_dial`), model
loading (`models`) and the GGUF cache (`model_cache`)."""
