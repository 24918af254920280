"""The creative control manifold M(s) and the two-stage schedule.

One dial s in [0, 1] sets every "creative sparsity" knob at once (DESIGN.md):

    T(s)      = T0 * exp(kT * s * (1 - s/2))                 sampling temperature
    p_nuc(s)  = p0 + kp * s * tanh(s / sp)                   nucleus (top-p) mass
    K(s)      = K0 + kK * s * E * (1 - exp(-s / tK))         MoE experts per token
    k_attn(s) = k0 + ka * s * d * sqrt(1 - s^2)              kept fraction of attention blocks

Each value is clamped to its valid range: T to [TEMPERATURE_MIN, TEMPERATURE_MAX],
p_nuc to [NUCLEUS_MIN, 1], K to the integers [1, E], k_attn to [ATTENTION_BUDGET_MIN, 1].

The constants, and why they have these values (all overridable in `SparsityConfig`):

- T0 = ``temperature_base`` = 1.0: at s = 0 sampling is untempered.
  kT = ``temperature_gain`` = 0.5: T rises monotonically on [0, 1] (dT/ds = kT (1 - s) T >= 0)
  to T(1) = e^0.25 = 1.28; stage A (s = 0.7) samples at 1.26, stage B (s = 0.3) at 1.14.
- p0 = ``nucleus_base`` = 0.9 and kp = ``nucleus_gain`` = 0.12, sp = ``nucleus_scale`` = 0.5:
  p(0.3) = 0.919, p(0.7) = 0.974, p reaches the clamp 1.0 near s = 0.93.
  The formula forces p(0) = p0, and s * tanh(s/sp) >= 0, so p0 = 1 would clamp p to 1
  at every s and the diverge stage could never have a wider nucleus than the refine
  stage; p0 = 0.9 (the usual dense top-p) keeps that ordering. At s = 0 the processor is
  therefore plain top-p = 0.9 sampling; ``nucleus_adaptation=False`` (p = 1 at every s)
  or ``nucleus_base=1.0`` makes s = 0 the exact identity.
- K0 = the model's own experts per token, E = its number of experts,
  kK = ``moe_expert_entropy`` = 0.5, tK = ``expert_scale`` = 0.5: K grows with s
  (Mixtral, E = 8, K0 = 2: K(0.3) = 3, K(0.7) = 4); K is rounded half up.
- k0 = 1 (fixed): at s = 0 attention is dense, so a patched model equals SDPA there.
  d = -1 (fixed, the direction: s removes blocks) and ka = 2 * ``attention_sparsity``,
  so the removed fraction peaks at exactly ``attention_sparsity`` when s = 1/sqrt(2).
  With the default 0.5: k_attn(0.3) = 0.71, k_attn(0.7) = 0.50.
  NOT monotonic: s * sqrt(1 - s^2) rises to 1/2 at s = 1/sqrt(2) ~ 0.707 and falls back to
  0 at s = 1, so k_attn(1) = 1 (dense again). Every s in the diverge range [0.6, 0.8]
  keeps fewer blocks (0.50..0.52) than every s in the refine range [0.2, 0.4] (0.63..0.80).

So stage A (diverge, s in [0.6, 0.8]) is hotter, has a wider nucleus, more experts and
fewer kept attention blocks than stage B (refine, s in [0.2, 0.4]).

The running logits processor publishes its current s (`set_current_sparsity`), and
attention patches read it (`current_sparsity`) to choose k_attn(s) for the same step.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from .config import SparseAttentionConfig

#: Clamp range of the temperature T(s).
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 3.0
#: Smallest nucleus mass p_nuc(s) (the processor always keeps at least one token anyway).
NUCLEUS_MIN = 0.01
#: Smallest kept fraction of attention blocks k_attn(s).
ATTENTION_BUDGET_MIN = 0.01
#: k_attn(0): dense attention at s = 0.
ATTENTION_BUDGET_BASE = 1.0
#: Direction d of the attention term: -1 means a larger s removes blocks.
ATTENTION_DIRECTION = -1.0

TEMPERATURE_SCHEDULES = ("two_stage", "constant")


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    x = float(value)
    bad = math.isnan(x) or x < low or x > high or (low_open and x == low) or (high_open and x == high)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value}")
    return x


def _check_sparsity(name: str, s: Any) -> float:
    return _check_float(name, s, 0.0, 1.0)


@dataclass
class SparsityConfig:
    """The paper's creative-sparsity settings plus the manifold constants (validated).

    Attributes:
        attention_sparsity: peak fraction of attention blocks the dial removes (reached at
            s = 1/sqrt(2)); sets ka = 2 * attention_sparsity. Range [0, 1).
        token_pruning_rate: before the nucleus, the processor drops this fraction of the
            vocabulary with the lowest probabilities (keeps ceil((1 - rate) * V) tokens,
            at least one). 0 disables it. Range [0, 1).
        moe_expert_entropy: kK, how many extra experts per token the dial adds (as a
            fraction of s * E * (1 - exp(-s / tK))). Range [0, 1].
        kv_reuse_ratio: fraction of consecutive calls of one attention layer that reuse
            the cached block mask instead of predicting it anew (diffusers denoising
            steps); see `mask_refresh_interval`. Range [0, 1).
        temperature_schedule: "two_stage" (T follows T(s) as s moves through the
            schedule) or "constant" (T = T0 at every s).
        nucleus_adaptation: apply p_nuc(s); False means no nucleus filtering (p = 1).
        simthreshd1, cdfthreshd, pvthreshd: kernel thresholds used with k_attn(s)
            (see `SparseAttentionConfig`).
        temperature_base (T0), temperature_gain (kT), nucleus_base (p0), nucleus_gain (kp),
            nucleus_scale (sp), expert_scale (tK): manifold constants (module docstring).

    Example:
        >>> cfg = SparsityConfig(attention_sparsity=0.6)
        >>> cfg.temperature_schedule
        'two_stage'
    """

    attention_sparsity: float = 0.5
    token_pruning_rate: float = 0.0
    moe_expert_entropy: float = 0.5
    kv_reuse_ratio: float = 0.0
    temperature_schedule: str = "two_stage"
    nucleus_adaptation: bool = True
    simthreshd1: float = 0.6
    cdfthreshd: float = 0.98
    pvthreshd: float = 50.0
    temperature_base: float = 1.0
    temperature_gain: float = 0.5
    nucleus_base: float = 0.9
    nucleus_gain: float = 0.12
    nucleus_scale: float = 0.5
    expert_scale: float = 0.5

    def __post_init__(self) -> None:
        _check_float("attention_sparsity", self.attention_sparsity, 0.0, 1.0, high_open=True)
        _check_float("token_pruning_rate", self.token_pruning_rate, 0.0, 1.0, high_open=True)
        _check_float("moe_expert_entropy", self.moe_expert_entropy, 0.0, 1.0)
        _check_float("kv_reuse_ratio", self.kv_reuse_ratio, 0.0, 1.0, high_open=True)
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, "
                             f"got {self.temperature_schedule!r}")
        if not isinstance(self.nucleus_adaptation, bool):
            raise TypeError(f"nucleus_adaptation must be a bool, got {type(self.nucleus_adaptation).__name__}")
        _check_float("simthreshd1", self.simthreshd1, -1.0, 2.0)
        _check_float("cdfthreshd", self.cdfthreshd, 0.0, 1.0)
        _check_float("pvthreshd", self.pvthreshd, 0.0, math.inf)
        _check_float("temperature_base", self.temperature_base, TEMPERATURE_MIN, TEMPERATURE_MAX)
        _check_float("temperature_gain", self.temperature_gain, -5.0, 5.0)
        _check_float("nucleus_base", self.nucleus_base, 0.0, 1.0, low_open=True)
        _check_float("nucleus_gain", self.nucleus_gain, -1.0, 1.0)
        _check_float("nucleus_scale", self.nucleus_scale, 0.0, 100.0, low_open=True)
        _check_float("expert_scale", self.expert_scale, 0.0, 100.0, low_open=True)

    @property
    def mask_refresh_interval(self) -> int:
        """Calls per predicted block mask implied by ``kv_reuse_ratio``: a mask predicted
        once serves ``n`` calls, reusing it on the fraction (n - 1) / n closest to the
        ratio from below (0 -> 1, 0.5 -> 2, 0.75 -> 4)."""
        return int(math.floor(1.0 / (1.0 - self.kv_reuse_ratio) + 1e-9))


@dataclass(frozen=True)
class ControlPoint:
    """M(s): the knobs for one value of the dial.

    Attributes:
        s: the dial, in [0, 1].
        temperature: T(s) in [TEMPERATURE_MIN, TEMPERATURE_MAX].
        top_p: p_nuc(s) in [NUCLEUS_MIN, 1] (1.0 = no nucleus filtering).
        num_experts: K(s), MoE experts per token in [1, E], or None for dense models.
        attention_budget: k_attn(s), kept fraction of attention blocks in (0, 1].
        simthreshd1, cdfthreshd, pvthreshd: kernel thresholds that go with it.
    """

    s: float
    temperature: float
    top_p: float
    num_experts: int | None
    attention_budget: float
    simthreshd1: float = 0.6
    cdfthreshd: float = 0.98
    pvthreshd: float = 50.0

    @property
    def is_dense(self) -> bool:
        """Whether attention keeps every block (k_attn = 1)."""
        return self.attention_budget >= 1.0

    def attention_config(self, base: SparseAttentionConfig | None = None) -> SparseAttentionConfig:
        """The kernel config for this point: ``topk = attention_budget`` with this point's
        thresholds on top of ``base`` (default `SparseAttentionConfig()`); a dense config
        (every block kept, no pv skip) when the budget is 1, so s = 0 equals SDPA.

        Example:
            >>> cp = SparsityController().get_sparsity_params(0.7)
            >>> round(cp.attention_config().topk, 3)
            0.5
        """
        if base is not None and not isinstance(base, SparseAttentionConfig):
            raise TypeError(f"base must be a SparseAttentionConfig or None, got {type(base).__name__}")
        base = base if base is not None else SparseAttentionConfig()
        if self.is_dense:
            return base.replace(simthreshd1=1.0, cdfthreshd=1.0, topk=None, pvthreshd=math.inf)
        return base.replace(topk=self.attention_budget, simthreshd1=self.simthreshd1,
                            cdfthreshd=self.cdfthreshd, pvthreshd=self.pvthreshd)


class SparsityController:
    """Maps the dial s to the control point M(s) (see the module docstring for formulas).

    Args:
        config: the settings and manifold constants (default `SparsityConfig()`).
        num_experts: E, the MoE model's number of experts; None for dense models (K(s) None).
        experts_per_token: K0, the model's default experts per token (default 1).

    Example:
        >>> ctl = SparsityController(num_experts=8, experts_per_token=2)
        >>> cp = ctl.get_sparsity_params(0.0)
        >>> (cp.temperature, cp.num_experts, cp.attention_budget)
        (1.0, 2, 1.0)
    """

    def __init__(self, config: SparsityConfig | None = None, *, num_experts: int | None = None,
                 experts_per_token: int | None = None) -> None:
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a SparsityConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else SparsityConfig()
        for name, value in (("num_experts", num_experts), ("experts_per_token", experts_per_token)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if experts_per_token is not None and num_experts is None:
            raise ValueError("experts_per_token needs num_experts (the total E)")
        if num_experts is not None and experts_per_token is not None and experts_per_token > num_experts:
            raise ValueError(f"experts_per_token ({experts_per_token}) must be <= num_experts ({num_experts})")
        self.num_experts = num_experts
        self.experts_per_token = (experts_per_token or 1) if num_experts is not None else None

    @classmethod
    def for_model(cls, model: Any, config: SparsityConfig | None = None) -> "SparsityController":
        """A controller with E and K0 read from a transformers model (or config): the
        ``num_local_experts`` / ``num_experts`` and ``num_experts_per_tok`` fields."""
        cfg = getattr(model, "config", model)
        total = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        per_tok = getattr(cfg, "num_experts_per_tok", None)
        if not total or not per_tok:
            return cls(config)
        return cls(config, num_experts=int(total), experts_per_token=int(per_tok))

    # The four coordinates of M(s), unclamped then clamped.
    def temperature(self, s: float) -> float:
        """T(s) = T0 exp(kT s (1 - s/2)), clamped; T0 at every s for a "constant" schedule."""
        c = self.config
        if c.temperature_schedule == "constant":
            return c.temperature_base
        t = c.temperature_base * math.exp(c.temperature_gain * s * (1.0 - s / 2.0))
        return min(max(t, TEMPERATURE_MIN), TEMPERATURE_MAX)

    def top_p(self, s: float) -> float:
        """p_nuc(s) = p0 + kp s tanh(s / sp), clamped to [NUCLEUS_MIN, 1]; 1 without adaptation."""
        c = self.config
        if not c.nucleus_adaptation:
            return 1.0
        p = c.nucleus_base + c.nucleus_gain * s * math.tanh(s / c.nucleus_scale)
        return min(max(p, NUCLEUS_MIN), 1.0)

    def experts(self, s: float) -> int | None:
        """K(s) = K0 + kK s E (1 - exp(-s / tK)), rounded half up, clamped to [1, E]."""
        if self.num_experts is None:
            return None
        c, e = self.config, self.num_experts
        k = self.experts_per_token + c.moe_expert_entropy * s * e * (1.0 - math.exp(-s / c.expert_scale))
        return int(min(max(math.floor(k + 0.5), 1), e))

    def attention_budget(self, s: float) -> float:
        """k_attn(s) = k0 + ka s d sqrt(1 - s^2), k0 = 1, d = -1, ka = 2 attention_sparsity,
        clamped to [ATTENTION_BUDGET_MIN, 1]."""
        ka = 2.0 * self.config.attention_sparsity
        k = ATTENTION_BUDGET_BASE + ka * s * ATTENTION_DIRECTION * math.sqrt(max(0.0, 1.0 - s * s))
        return min(max(k, ATTENTION_BUDGET_MIN), 1.0)

    def get_sparsity_params(self, s: float) -> ControlPoint:
        """M(s) = {T(s), p_nuc(s), K(s), k_attn(s)} plus the kernel thresholds.

        Args:
            s: the dial, a float in [0, 1].

        Example:
            >>> cp = SparsityController().get_sparsity_params(0.3)
            >>> round(cp.temperature, 4), round(cp.top_p, 4), round(cp.attention_budget, 4)
            (1.136, 0.9193, 0.7138)
        """
        s = _check_sparsity("s", s)
        c = self.config
        return ControlPoint(s=s, temperature=self.temperature(s), top_p=self.top_p(s),
                            num_experts=self.experts(s), attention_budget=self.attention_budget(s),
                            simthreshd1=c.simthreshd1, cdfthreshd=c.cdfthreshd, pvthreshd=c.pvthreshd)


@dataclass
class TwoStageSchedule:
    """Diverge, then refine: s = ``diverge`` for progress < ``switch``, ``refine`` after.

    Attributes:
        diverge: s of stage A (exploration), in [0, 1].
        refine: s of stage B (consolidation), in [0, diverge].
        switch: fraction of the run spent in stage A, in [0, 1].

    Example:
        >>> sched = TwoStageSchedule(0.7, 0.3, switch=0.5)
        >>> sched.s_at(0.2), sched.s_at(0.5), sched.stage_at(0.9)
        (0.7, 0.3, 'refine')
    """

    diverge: float = 0.7
    refine: float = 0.3
    switch: float = 0.5

    def __post_init__(self) -> None:
        self.diverge = _check_sparsity("diverge", self.diverge)
        self.refine = _check_sparsity("refine", self.refine)
        self.switch = _check_float("switch", self.switch, 0.0, 1.0)
        if self.refine > self.diverge:
            raise ValueError(f"refine ({self.refine}) must be <= diverge ({self.diverge}): "
                             "stage B refines with less sparsity than stage A diverges")

    def stage_at(self, progress: float) -> str:
        """"diverge" while ``progress`` (step / num_steps, in [0, 1]) < switch, else "refine"."""
        progress = _check_float("progress", progress, 0.0, 1.0)
        return "diverge" if progress < self.switch else "refine"

    def s_at(self, progress: float) -> float:
        """The dial at ``progress`` (step / num_steps, in [0, 1])."""
        return self.diverge if self.stage_at(progress) == "diverge" else self.refine

    def switch_step(self, num_steps: int) -> int:
        """The first step index (0-based) of stage B for a run of ``num_steps`` steps:
        the smallest i with i / num_steps >= switch."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        return min(num_steps, max(0, math.ceil(self.switch * num_steps - 1e-9)))


_LOCAL = threading.local()


def current_sparsity() -> float | None:
    """The s published by the running logits processor in this thread, or None."""
    return getattr(_LOCAL, "s", None)


def set_current_sparsity(s: float | None) -> None:
    """Publish the dial for attention patches in this thread (None clears it)."""
    _LOCAL.s = None if s is None else _check_sparsity("s", s)
