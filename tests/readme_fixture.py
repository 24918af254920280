"""The README fixture: offline tiny stand-ins for the Hub models that README.md names, so
that every Python block of the README runs as written, on a CPU, in seconds
(tests/test_readme.py).

`install()` patches, in the process that runs the README blocks:

- diffusers: ``WanPipeline.from_pretrained(...)`` (and ``DiffusionPipeline.from_pretrained``
  with a Wan id) returns `TinyWanPipeline`: a tiny random Wan 2.1 (diffusers' test config)
  with a tiny VAE and no text encoder. Its ``encode_prompt`` returns seeded random
  embeddings; its calls run at 64 x 64 pixels, 5 frames and 4 denoising steps (whatever
  the block asks); ``.to("cuda")`` stays on the CPU where there is no GPU; ``torch_dtype`` is
  ignored (float32). Other pipeline classes raise, naming this file.
- transformers: ``AutoModelForCausalLM.from_pretrained(<hub id>, ...)`` returns a tiny
  random GPT-2 (a tiny Llama for ids naming Llama, Qwen, Mistral or SmolLM) built with
  the same keyword arguments that configs take (``attn_implementation`` included);
  ``AutoTokenizer.from_pretrained(<hub id>)`` returns a byte-level tokenizer (256 byte
  tokens and ``<|endoftext|>``). Existing local paths load as usual.
- hf_creative_sparse: ``creative.models.load_smollm2`` (what ``CreativeSparseWrapper()`` and the
  default scorer load) returns the tiny Llama and the byte-level tokenizer;
  ``find_optimal_sparsity`` runs `SMALL_SWEEP` (2 of the task's prompts, 2 samples of 16
  tokens a level) unless the block passes those arguments itself.

Outputs are therefore meaningless; what the test checks is that each block runs as
written with the package's real code paths (patching, reports, calibration files).

Run by hand: ``python tests/readme_fixture.py README.md`` (prints each block's time).
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from typing import Any

import torch

from hf_creative_sparse.testing import byte_tokenizer, tiny_gpt2, tiny_llama, tiny_random_transformer, tiny_vae

#: The fence a runnable block opens with, and the marker (on the line before the fence)
#: that skips a block; only GPU-only blocks may use it, with the reason after "skip:".
FENCE = "```python"
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<reason>[^>]*?)\s*-->")
#: What every `TinyWanPipeline` call runs with (pixels, frames, denoising steps).
TINY_CALL = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 4}
VOCAB = 320  # 256 bytes + <|endoftext|>, padded
#: What a README sweep generates per level (the real default, 4 samples x 64 tokens of
#: every prompt, takes minutes on a CPU even with the tiny model).
SMALL_SWEEP = {"prompts": 2, "num_samples": 2, "max_new_tokens": 16}
_LLAMA_IDS = ("llama", "qwen", "mistral", "smollm")


def extract_blocks(markdown: str) -> list[dict[str, Any]]:
    """Every ```python block of ``markdown``: {"line" (1-based, of the fence), "code",
    "skip" (the marker's reason, or None)}."""
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == FENCE:
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"README line {start + 1}: ```python block is never closed")
            previous = lines[start - 1] if start > 0 else ""
            marker = SKIP_MARKER.search(previous)
            blocks.append({"line": start + 1, "code": "\n".join(lines[start + 1:j]),
                           "skip": marker.group("reason") if marker else None})
            i = j
        i += 1
    return blocks


# -- tiny models -----------------------------------------------------------------------------


def tiny_causal_lm(name: str, **kwargs: Any) -> Any:
    """A tiny random GPT-2 or Llama (see the module docstring), eval mode, seeded."""
    attn = kwargs.pop("attn_implementation", None)
    eos = 256
    extra = {} if attn is None else {"attn_implementation": attn}
    if any(key in name.lower() for key in _LLAMA_IDS):
        model = tiny_llama(vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos,
                           pad_token_id=eos, **extra)
    else:
        model = tiny_gpt2(vocab_size=VOCAB, n_positions=2048, bos_token_id=eos, eos_token_id=eos, **extra)
    model.name_or_path = name
    return model


def _is_local(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.exists(os.fspath(path))


def tiny_wan_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    class TinyWanPipeline(WanPipeline):
        """Wan 2.1 with a tiny transformer and VAE; prompts become seeded random embeddings."""

        def encode_prompt(self, prompt: Any = None, negative_prompt: Any = None,
                          do_classifier_free_guidance: bool = True, num_videos_per_prompt: int = 1,
                          prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                          max_sequence_length: int = 226, device: Any = None, dtype: Any = None) -> Any:
            batch = (1 if isinstance(prompt, str) or prompt is None else len(prompt)) * num_videos_per_prompt
            g = torch.Generator().manual_seed(0)
            if prompt_embeds is None:
                prompt_embeds = torch.randn(batch, 16, 16, generator=g)
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negative_prompt_embeds = torch.randn(batch, 16, 16, generator=g)
            return prompt_embeds, negative_prompt_embeds

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.update(TINY_CALL)
            return super().__call__(*args, **kwargs)

        def to(self, *args: Any, **kwargs: Any) -> Any:
            wants_cuda = any("cuda" in str(a) for a in (*args, *kwargs.values()))
            if wants_cuda and not torch.cuda.is_available():
                return self
            return super().to(*args, **kwargs)

    transformer = tiny_random_transformer("wan", in_channels=16, out_channels=16)  # the tiny VAE's 16 channels
    vae = tiny_vae("wan")
    pipe = TinyWanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the patches ---------------------------------------------------------------------------------


def install() -> None:
    """Patch the loaders (see the module docstring); idempotent."""
    import diffusers
    import transformers

    from hf_creative_sparse.creative import models

    if getattr(install, "done", False):
        return

    original_pipeline = diffusers.DiffusionPipeline.from_pretrained.__func__

    def pipeline_from_pretrained(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_local(name):
            return original_pipeline(cls, name, *args, **kwargs)
        if cls.__name__ == "WanPipeline" or (cls.__name__ == "DiffusionPipeline" and "wan" in str(name).lower()):
            return tiny_wan_pipeline()
        raise NotImplementedError(f"tests/readme_fixture.py has no tiny stand-in for {cls.__name__}({name!r}); "
                                  "add one there")

    diffusers.DiffusionPipeline.from_pretrained = classmethod(pipeline_from_pretrained)

    original_lm = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def lm_from_pretrained(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_local(name) or kwargs.get("gguf_file"):
            return original_lm(cls, name, *args, **kwargs)
        return tiny_causal_lm(str(name), attn_implementation=kwargs.get("attn_implementation"))

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(lm_from_pretrained)

    original_tok = transformers.AutoTokenizer.from_pretrained.__func__

    def tok_from_pretrained(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_local(name) or kwargs.get("gguf_file"):
            return original_tok(cls, name, *args, **kwargs)
        return byte_tokenizer()

    transformers.AutoTokenizer.from_pretrained = classmethod(tok_from_pretrained)

    def load_smollm2(device: str = "cpu") -> tuple[Any, Any]:
        return tiny_causal_lm("smollm2").to(device), byte_tokenizer()

    models.load_smollm2 = load_smollm2

    from hf_creative_sparse.evaluation import sweep as autotune

    original_sweep = autotune.find_optimal_sparsity

    def small_sweep(model_or_wrapper: Any, task_type: str = "creative_writing", *args: Any, **kwargs: Any) -> Any:
        if not args:  # only keyword arguments: fill in the ones the block left to their defaults
            if kwargs.get("prompts") is None:
                kwargs["prompts"] = list(autotune.load_task(task_type)["prompts"])[:SMALL_SWEEP["prompts"]]
            kwargs.setdefault("num_samples", SMALL_SWEEP["num_samples"])
            kwargs.setdefault("max_new_tokens", SMALL_SWEEP["max_new_tokens"])
        return original_sweep(model_or_wrapper, task_type, *args, **kwargs)

    autotune.find_optimal_sparsity = small_sweep
    install.done = True


def run_readme(path: str) -> int:
    """Run every block of ``path`` in one namespace (blocks build on each other), in the
    current directory; print each block's time; return 1 at the first failure."""
    with open(path, encoding="utf-8") as fh:
        blocks = extract_blocks(fh.read())
    install()
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for block in blocks:
        if block["skip"] is not None:
            print(f"README line {block['line']}: skipped ({block['skip']})", flush=True)
            continue
        start = time.perf_counter()
        try:
            exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)
        except BaseException:
            print(f"README line {block['line']}: FAILED", flush=True)
            traceback.print_exc()
            return 1
        print(f"README line {block['line']}: ok in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(run_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
