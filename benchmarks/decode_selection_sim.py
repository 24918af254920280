"""Where decode sparsity loses perplexity: block-selection policies on SmolLM2-135M, emulated.

Teacher-forced sparse decoding is a forward pass in which row t attends only to the key
blocks selected for its query q_t among the keys 0..t: every selection rule of
`hf_creative_sparse.ops.decode` depends on nothing else. So instead of one decode step per
token (minutes per policy on a 2-core CPU) this script prefills the first ``--start`` tokens
densely once, then feeds the rest in chunks of ``--chunk`` rows through an attention function
that builds, for each row, the block mask the decode policy would pick. The same model, the
same positions scored, the same math as `benchmarks/decode_quality.py` (which runs the real
decode path and reports the figures); this script is for comparing many policies, and for
the ones the package does not implement (an oracle selection by true attention mass, per
query-head selection), to find where the loss comes from.

Policies (``--policies``, comma-separated fields ``key=value``; defaults in brackets):
    budget [0.25]: kept fraction of the blocks (forced blocks included unless forced_out=1).
    bs [32]: block size. sink [1], recent [2]: forced leading / trailing blocks.
    score [quest_sum]: ESTIMATE_GROUP. ESTIMATE: quest (the min/max bound on q . k), mean
        (q . mean key), rem (gauss, but the log-sum-exp of n Gaussian logits of variance v
        is n's: log n + v/2 while v <= 2 ln n, then sqrt(2 v ln n), the random energy
        model's law: the variance term no longer exceeds the largest of n draws), gauss (log E exp(scale q . k) for the block's keys as a Gaussian with
        their per-channel mean and variance: scale q . mean + scale^2 / 2 (q*q) . var),
        oracle (the true attention mass of the block), union (per block the larger of the
        gauss_sm and quest_sm group scores: a block either ranks high is kept), rankmix (the
        better of the two rank positions, a block's rank being its best rank in either
        list). GROUP: sum (summed over the kv
        head's query heads, the package's rule), sm (each head's estimates turned into
        masses by a softmax over the blocks, summed over the group), max (those masses, the
        largest over the group), pN (those masses, the power mean of order N/10 over the
        group: p20 = root of the summed squares), head (each query head
        selects its own blocks; the kept fraction is per query head, the union read per kv
        head is larger). oracle alone is oracle_mass.
    dense_layers [0]: first layers decoded dense. min_context [start]: shorter caches dense.
    vscale [1.0]: the factor on the gauss variance term (0 = mean key only).
    temp [1.0]: the factor on the logit estimates before the per-head softmax (sm, max, pN).
    recent_tok [0]: also keep every block holding one of the last recent_tok keys (counted).
    forced_out [0]: 1 = the budget counts only the selected blocks, the forced ones on top.
    pool [0]: 1 = every skipped block enters the softmax as one pooled key (mean key, mean
        value, logit + log of its key count).
    name: a label.
A policy of just ``dense`` runs every row dense (the reference).

    python benchmarks/decode_selection_sim.py --set tuning --context 4096 --start 2048 \\
        --policies dense "budget=0.25" "budget=0.25,dense_layers=2"
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decode_quality import TEXT_SETS, load_ids


@dataclass
class Policy:
    name: str
    dense: bool = False
    budget: float = 0.25
    bs: int = 32
    sink: int = 1
    recent: int = 2
    score: str = "quest_sum"
    dense_layers: int = 0
    min_context: int | None = None
    forced_out: bool = False
    pool: bool = False
    vscale: float = 1.0
    temp: float = 1.0
    recent_tok: int = 0

    @classmethod
    def parse(cls, text: str) -> "Policy":
        if text == "dense":
            return cls(name="dense", dense=True)
        kw: dict = {"name": text}
        for part in text.split(","):
            key, value = part.split("=", 1)
            if key not in cls.__dataclass_fields__ or key == "dense":
                raise ValueError(f"unknown policy field {key!r} in {text!r}")
            if key in ("budget", "vscale", "temp"):
                kw[key] = float(value)
            elif key in ("score", "name"):
                kw[key] = value
            elif key in ("forced_out", "pool"):
                kw[key] = bool(int(value))
            else:
                kw[key] = int(value)
        est, _, agg = kw.get("score", "quest_sum").partition("_")
        if est not in ("quest", "mean", "gauss", "rem", "oracle", "union", "rankmix") or not (
                agg in ("", "sum", "sm", "head", "mass", "max") or (agg.startswith("p") and agg[1:].isdigit())):
            raise ValueError(f"unknown score {kw['score']!r}")
        return cls(**kw)


class Emulator:
    """The attention function: dense for the prefill, the policy's block masks for the
    scored rows; counts the kept fraction of the rows that ran sparse."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.kept_sum = 0.0  # kept fraction per query head, summed over rows and layers
        self.union_sum = 0.0  # the blocks read per kv head (the union over its query heads)
        self.rows = 0

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        b, hq, c, d = query.shape
        hkv, n = key.shape[1], key.shape[2]
        g = hq // hkv
        scale = scaling if scaling is not None else d ** -0.5
        pos = torch.arange(n - c, n)
        causal = torch.arange(n)[None, :] <= pos[:, None]  # [C, N]
        p = self.policy
        layer = module.layer_idx
        if p is None or p.dense or layer < p.dense_layers:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scale,
                                                 enable_gqa=True)
            if p is not None and not p.dense:
                self.kept_sum += c
                self.union_sum += c
                self.rows += c
            return out.transpose(1, 2).contiguous(), None
        bs = p.bs
        nb = -(-n // bs)
        kp = F.pad(key, (0, 0, 0, nb * bs - n)).view(b, hkv, nb, bs, d)
        qg = query.view(b, hkv, g, c, d)
        logits = (qg @ key[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, C, N]
        blk = pos // bs  # the block of each row's own key
        nbt = blk + 1
        j = torch.arange(nb)
        allowed = j[None, :] <= blk[:, None]  # [C, nb]
        recent_first = torch.minimum(blk - p.recent + 1, (pos - p.recent_tok + 1).clamp_min(0) // bs)
        force = allowed & ((j[None, :] < p.sink) | (j[None, :] >= recent_first[:, None]))
        forced = force.sum(-1)
        want = torch.ceil(p.budget * nbt - 1e-9).long()
        keep = torch.minimum(nbt, forced + want if p.forced_out else torch.maximum(forced, want))
        min_ctx = p.min_context if p.min_context is not None else 0
        dense_row = (pos + 1 < min_ctx) | (keep > 0.9 * nbt)
        est, _, agg = p.score.partition("_")
        agg = agg or ("mass" if est == "oracle" else "sum")

        def estimate(est: str) -> torch.Tensor:  # per query head, in logit units [B, Hkv, G, C, nb]
            if est == "quest":
                kmin, kmax = kp.amin(3)[:, :, None], kp.amax(3)[:, :, None]
                return (qg.clamp_min(0) @ kmax.transpose(-1, -2) + qg.clamp_max(0) @ kmin.transpose(-1, -2)) * scale
            if est == "mean":
                return (qg @ kp.mean(3)[:, :, None].transpose(-1, -2)) * scale
            # gauss: log E exp(s q.k) for keys ~ N(mean, diag(var)) of the block
            mu, var = kp.mean(3)[:, :, None], kp.var(3, unbiased=False)[:, :, None]
            v = p.vscale * scale ** 2 * (qg * qg) @ var.transpose(-1, -2)  # variance of the logits
            if est == "rem":  # n Gaussian logits: sigma^2/2 below sigma = sqrt(2 ln n), then the max
                lim = 2 * math.log(bs)
                return (qg @ mu.transpose(-1, -2)) * scale + torch.where(
                    v <= lim, 0.5 * v, (v * lim).sqrt() - 0.5 * lim)
            return (qg @ mu.transpose(-1, -2)) * scale + 0.5 * v

        def shares(x: torch.Tensor) -> torch.Tensor:  # per-head softmax over the allowed blocks
            return torch.softmax((p.temp * x).masked_fill(~allowed, -math.inf), -1)

        def ranks(x: torch.Tensor) -> torch.Tensor:
            order = x.masked_fill(~allowed, -math.inf).argsort(-1, descending=True)
            return torch.empty_like(order).scatter_(-1, order, torch.arange(nb).expand_as(order))

        if est == "oracle":  # true attention mass of each block, per query head
            mass = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
            score = F.pad(mass, (0, nb * bs - n)).view(b, hkv, g, c, nb, bs).sum(-1)
        elif est == "union":
            score = torch.maximum(shares(estimate("gauss")).sum(2, keepdim=True),
                                  shares(estimate("quest")).sum(2, keepdim=True))
            agg = "done"
        elif est == "rankmix":
            score = -torch.minimum(ranks(shares(estimate("gauss")).sum(2, keepdim=True)),
                                   ranks(estimate("quest").sum(2, keepdim=True))).float()
            agg = "done"
        else:
            score = estimate(est)
        if agg == "sum":  # the package's rule: summed over the group
            score = score.sum(2, keepdim=True)
        elif agg in ("sm", "mass"):  # estimated attention mass of each head, summed over the group
            if agg == "sm":
                score = shares(score)
            score = score.sum(2, keepdim=True)
        elif agg == "max":
            score = (shares(score) if est != "oracle" else score).amax(2, keepdim=True)
        elif agg.startswith("p") and agg[1:].isdigit():
            e = int(agg[1:]) / 10
            score = ((shares(score) if est != "oracle" else score) ** e).sum(2, keepdim=True)
        elif agg not in ("head", "done"):
            raise ValueError(f"unknown aggregation in score {p.score!r}")
        score = score.masked_fill(~allowed, -math.inf).masked_fill(force, math.inf)
        order = score.argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb).expand_as(order))
        sel = (rank < keep[:, None]) | dense_row[:, None]
        sel = sel & allowed  # [B, Hkv, 1 or G, C, nb]
        keymask = sel.repeat_interleave(bs, -1)[..., :n] & causal
        logits = logits.masked_fill(~keymask, -math.inf)
        if p.pool:
            skipped = allowed & ~sel & (j[None, :] < blk[:, None])  # complete blocks only
            vp = F.pad(value, (0, 0, 0, nb * bs - n)).view(b, hkv, nb, bs, d)
            pl = (qg @ kp.mean(3)[:, :, None].transpose(-1, -2)) * scale + math.log(bs)
            pl = pl.masked_fill(~skipped, -math.inf)  # [B, Hkv, G, C, nb]
            w = torch.softmax(torch.cat([logits, pl], -1), -1)
            out = w[..., :n] @ value[:, :, None] + w[..., n:] @ vp.mean(3)[:, :, None]
        else:
            out = torch.softmax(logits, -1) @ value[:, :, None]
        frac = sel.float().sum(-1).mean(dim=(0, 1, 2)) / nbt  # [C] (per-head: mean over heads)
        self.kept_sum += float(frac.sum())
        self.union_sum += float((sel.any(2).float().sum(-1).mean(dim=(0, 1)) / nbt).sum())
        self.rows += c
        return out.reshape(b, hq, c, d).transpose(1, 2).contiguous(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=sorted(TEXT_SETS), default="tuning")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--start", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--policies", nargs="+", default=["dense", "budget=0.25"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache
    from transformers.modeling_utils import AttentionInterface

    from hf_creative_sparse.creative.models import load_smollm2

    policies = [Policy.parse(t) for t in args.policies]
    model, tok = load_smollm2()
    emu = Emulator()
    AttentionInterface._global_mapping["hcs_decode_emulation"] = emu
    model.config._attn_implementation = "hcs_decode_emulation"
    labels, ids = load_ids(tok, args.set, args.context)
    t0 = time.perf_counter()
    with torch.no_grad():
        prefix = DynamicCache()
        model(ids[:, :args.start], past_key_values=prefix, use_cache=True)
    print(f"prefill {time.perf_counter() - t0:.0f} s", flush=True)
    scored = ids.shape[1] - 1 - args.start
    results = []
    for p in policies:
        if p.min_context is None:
            p.min_context = args.start
        emu.policy, emu.kept_sum, emu.union_sum, emu.rows = p, 0.0, 0.0, 0
        cache = copy.deepcopy(prefix)
        nll = torch.zeros(ids.shape[0], dtype=torch.float64)
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(args.start, ids.shape[1] - 1, args.chunk):
                e = min(s + args.chunk, ids.shape[1] - 1)
                logits = model(ids[:, s:e], past_key_values=cache, use_cache=True).logits.float()
                nll += F.cross_entropy(logits.transpose(1, 2), ids[:, s + 1:e + 1], reduction="none").double().sum(1)
        ppl = math.exp(float(nll.sum()) / (scored * len(labels)))
        per_text = [math.exp(float(x) / scored) for x in nll]
        kept = emu.kept_sum / emu.rows if emu.rows else 1.0
        read = emu.union_sum / emu.rows if emu.rows else 1.0
        results.append((p.name, ppl, kept, read, per_text))
        print(f"{p.name:50s} ppl {ppl:8.3f} kept {kept:.3f} read {read:.3f} {time.perf_counter() - t0:.0f} s  "
              + " ".join(f"{x:.3f}" for x in per_text), flush=True)
    dense = next((r[1] for r in results if r[0] == "dense"), math.nan)
    print(f"\nset {args.set} ({', '.join(labels)}), {args.context} tokens, {args.start} prefilled, "
          f"{scored} rows scored per text")
    print("\n| policy | perplexity | vs dense | kept fraction | read per kv head |\n|---|---|---|---|---|")
    for name, ppl, kept, read, _ in results:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / dense - 1):+.2f}% | {kept:.3f} | {read:.3f} |")


if __name__ == "__main__":
    main()
