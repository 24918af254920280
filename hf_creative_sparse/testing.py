"""Tiny random models that the tests, the examples and the CLI share (``calibrate --tiny``).

Why a module of the package: the CLI's offline examples need them at run time, and one
definition of each builder keeps the tests, the examples and the CLI on the same models.
Every builder is seeded and returns eval-mode models with random weights: outputs mean
nothing, shapes and code paths are real. diffusers and transformers are imported inside
the functions, so importing this module costs nothing but torch.

- Diffusion transformers of the four patched families (`TINY_FAMILIES`), from diffusers'
  own test configs: `tiny_random_transformer` (any config field can be overridden), and
  `tiny_transformer`, the same with attention made local (`localise_attention`) so that a
  block mask can thin it, as trained video and image models attend; `tiny_vae`;
  `tiny_pipeline` (no text encoders); `tiny_example` (the pipeline and a seeded call);
  `smooth_noise` (latents that vary slowly in space).
- Causal LMs: `tiny_llama`, `tiny_gpt2` and a byte-level tokenizer (`byte_tokenizer`).

Example:
    >>> from hf_creative_sparse.testing import tiny_llama
    >>> tiny_llama().config.num_hidden_layers
    2
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: The diffusers families the package patches, each with a tiny config below.
TINY_FAMILIES = ("cogvideox", "flux", "hunyuan_video", "wan")
#: Multiplier of the localised q/k norm weights (sharper softmax, local attention).
TINY_SHARPNESS = 4.0
#: Multiplier of the localised q/k projection weights: the shared bias dominates, so the
#: scores follow RoPE's relative positions more than the content.
CONTENT_WEIGHT = 0.3

#: family -> (diffusers class, constructor arguments) of the tiny transformers.
_TRANSFORMERS: dict[str, tuple[str, dict[str, Any]]] = {
    # head_dim 16 (not diffusers' tests' 8) so the 3-D RoPE (t, h, w = 4, 6, 6 dims) applies
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=32, sample_height=32, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None)),
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
}

#: family -> (diffusers class, constructor arguments) of the tiny VAEs (pixel output).
_VAES: dict[str, tuple[str, dict[str, Any]]] = {
    "cogvideox": ("AutoencoderKLCogVideoX", dict(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)),
    "hunyuan_video": ("AutoencoderKLHunyuanVideo", dict(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)),
    # latent channels 16: the Wan transformer that decodes through it needs in/out_channels=16
    "wan": ("AutoencoderKLWan", dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])),
    "flux": ("AutoencoderKL", dict(sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                                   norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                                   shift_factor=0.0609, scaling_factor=1.5035)),
}


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def tiny_random_transformer(family: str, **overrides: Any) -> torch.nn.Module:
    """The tiny diffusers transformer of ``family`` (one of `TINY_FAMILIES`) with seeded
    random weights, in eval mode; ``overrides`` replace fields of its config."""
    import diffusers

    _check_family(family)
    name, config = _TRANSFORMERS[family]
    torch.manual_seed(0)
    return getattr(diffusers, name)(**{**config, **overrides}).eval()


def tiny_vae(family: str) -> torch.nn.Module:
    """The tiny VAE of ``family`` (seeded random weights, eval mode)."""
    import diffusers

    _check_family(family)
    name, config = _VAES[family]
    torch.manual_seed(0)
    return getattr(diffusers, name)(**config).eval()


def _tie(to_q: torch.nn.Linear, to_k: torch.nn.Linear, norm_q: Any, norm_k: Any, sharpness: float) -> None:
    to_q.weight.mul_(CONTENT_WEIGHT)
    if to_q.bias is not None:
        g = torch.Generator().manual_seed(to_q.weight.shape[0])
        to_q.bias.copy_(torch.randn(to_q.bias.shape, generator=g))
    to_k.weight.copy_(to_q.weight)
    if to_q.bias is not None and to_k.bias is not None:
        to_k.bias.copy_(to_q.bias)
    if getattr(norm_q, "weight", None) is not None and getattr(norm_k, "weight", None) is not None:
        norm_k.weight.copy_(norm_q.weight)
        norm_q.weight.mul_(sharpness)
        norm_k.weight.mul_(sharpness)


def localise_attention(transformer: torch.nn.Module, sharpness: float = TINY_SHARPNESS) -> torch.nn.Module:
    """Make a random-weight transformer (any of the four families) attend locally, in place.

    Random weights attend almost uniformly, and no block mask thins uniform attention within
    a few percent of L1, while trained video and image transformers attend locally, mostly
    through RoPE. So every self-attention gets a shared seeded random q bias that dominates
    the content term (q weights * `CONTENT_WEIGHT`), k projections := q projections and q/k
    norm weights * ``sharpness``: the scores then follow RoPE's relative positions, and each
    token attends mostly to its neighbours whatever the input.
    """
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if not hasattr(module, "to_q") or not hasattr(module, "to_k"):
                continue
            if name.endswith("attn2"):  # Wan's cross-attention keys are text: leave alone
                continue
            _tie(module.to_q, module.to_k, getattr(module, "norm_q", None), getattr(module, "norm_k", None), sharpness)
            if getattr(module, "add_q_proj", None) is not None and getattr(module, "add_k_proj", None) is not None:
                _tie(module.add_q_proj, module.add_k_proj, getattr(module, "norm_added_q", None),
                     getattr(module, "norm_added_k", None), sharpness)
    return transformer


def tiny_transformer(family: str, **overrides: Any) -> torch.nn.Module:
    """`tiny_random_transformer` with local attention (`localise_attention`): what the
    CLI's ``calibrate --tiny`` calibrates."""
    return localise_attention(tiny_random_transformer(family, **overrides))


def tiny_pipeline(family: str, transformer: torch.nn.Module | None = None, *, vae: bool = False) -> Any:
    """The family's diffusers pipeline without text encoders (callers pass prompt
    embeddings): ``transformer`` (default `tiny_random_transformer`) and, with ``vae``, the
    tiny VAE (pixel output; the Wan transformer then has 16 latent channels), else none
    (``output_type="latent"``)."""
    import diffusers

    _check_family(family)
    if transformer is None:
        transformer = tiny_random_transformer(family, **({"in_channels": 16, "out_channels": 16}
                                                         if vae and family == "wan" else {}))
    parts: dict[str, Any] = dict(transformer=transformer, vae=tiny_vae(family) if vae else None,
                                 tokenizer=None, text_encoder=None)
    if family == "cogvideox":
        return diffusers.CogVideoXPipeline(scheduler=diffusers.CogVideoXDDIMScheduler(), **parts)
    parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler()
    if family in ("flux", "hunyuan_video"):
        parts.update(text_encoder_2=None, tokenizer_2=None)
    cls = {"flux": "FluxPipeline", "hunyuan_video": "HunyuanVideoPipeline", "wan": "WanPipeline"}[family]
    return getattr(diffusers, cls)(**parts)


def smooth_noise(shape: tuple[int, ...], seed: int, coarse: int = 8) -> torch.Tensor:
    """Noise that varies slowly over the last two (spatial) dims: coarse noise upsampled
    by ``coarse`` plus 10% white noise (float32)."""
    g = torch.Generator().manual_seed(seed)
    *lead, h, w = shape
    planes = int(torch.tensor(lead).prod()) if lead else 1
    low = torch.randn(planes, 1, max(1, h // coarse), max(1, w // coarse), generator=g)
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (up.view(*shape) + 0.1 * torch.randn(*shape, generator=g)).float()


def tiny_example(family: str, *, steps: int = 2) -> tuple[Any, Callable[[int], Any]]:
    """(pipeline, call) of the CLI's tiny example: the pipeline of `tiny_transformer`
    (local attention); ``call(i)`` runs it once with the i-th seeded prompt embeddings and
    smooth latents, without CFG, to latents.

    Sequence lengths: Wan 2 x 16 x 32 = 1024 video tokens; Flux 24 text + 1024 image tokens;
    CogVideoX 8 text + 3 x 16 x 16 = 776; HunyuanVideo 2 x 16 x 32 = 1024 video + 20 text.
    """
    pipe = tiny_pipeline(family, tiny_transformer(family))

    def call(i: int) -> Any:
        g = torch.Generator().manual_seed(1000 + i)
        common = dict(num_inference_steps=steps, output_type="latent", return_dict=False)
        if family == "cogvideox":  # latents (batch, frames, channels, h, w)
            return pipe(prompt_embeds=torch.randn(1, 8, 8, generator=g), height=256, width=256, num_frames=9,
                        latents=smooth_noise((1, 3, 4, 32, 32), seed=i), guidance_scale=1.0, **common)[0]
        if family == "hunyuan_video":
            return pipe(prompt_embeds=torch.randn(1, 20, 16, generator=g),
                        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                        prompt_attention_mask=torch.ones(1, 20, dtype=torch.long), height=128, width=256,
                        num_frames=5, latents=smooth_noise((1, 4, 2, 16, 32), seed=i), **common)[0]
        if family == "wan":
            return pipe(prompt_embeds=torch.randn(1, 12, 16, generator=g), height=256, width=512, num_frames=5,
                        latents=smooth_noise((1, 4, 2, 32, 64), seed=i), guidance_scale=1.0, **common)[0]
        latents = pipe._pack_latents(smooth_noise((1, 1, 64, 64), seed=i), 1, 1, 64, 64)
        return pipe(prompt_embeds=torch.randn(1, 24, 32, generator=g),
                    pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=512, width=512,
                    latents=latents, **common)[0]

    pipe.set_progress_bar_config(disable=True)
    return pipe, call


# ------------------------------------------------------------------------------ causal LMs


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges: every byte is one token (ids 0-255) and
    ``<|endoftext|>`` (id 256) is bos, eos, pad and unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_llama(*, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny random ``LlamaForCausalLM`` (2 layers, 4 q heads over 2 kv heads, width 64;
    ``config`` replaces any of its fields), seeded with ``seed``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**defaults, **config})).eval()


def tiny_gpt2(*, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny random ``GPT2LMHeadModel`` (2 layers, 4 heads, width 64; ``config`` replaces
    any of its fields), seeded with ``seed``, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=1024)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**defaults, **config})).eval()
