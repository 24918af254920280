"""Creative control: the control manifold M(s) and the dial (`control`), the logits
processor and the wrapper for transformers' ``generate`` (`generation`), decoding
constraints (`constraints`), K(s) for mixture-of-experts routers (`moe`), the dial over the
denoising steps of diffusion LMs (`diffusion_dial`) and model loading (`model_cache`)."""
