"""The creative control manifold M(s) and the two-stage schedule.

One dial s in [0, 1] sets every "creative sparsity" knob at once (DESIGN.md):

    T(s)      = T0 * exp(kT * s * (1 - s/2))                 sampling temperature
    p_nuc(s)  = p0 + kp * s * tanh(s / sp)                   nucleus (top-p) mass
    K(s)      = K0 + kK * s * E * (1 - exp(-s / tK))         MoE experts per token
    k_attn(s) = k0 + ka * s * d * sqrt(1 - s^2)              kept fraction of attention blocks

Each value is clamped to its valid range: T to [TEMPERATURE_MIN, TEMPERATURE_MAX],
p_nuc to [NUCLEUS_MIN, 1], K to the integers [1, E], k_attn to [ATTENTION_BUDGET_MIN, 1].

The constants, and why they have these values (all overridable in `SparsityConfig`):

The defaults were chosen by a sweep on SmolLM2-135M-Instruct (BENCHMARKS.md, "Creative
decoding"; `SparsityConfig.from_stages` solves the constants from two stage targets).
The seed's constants (T0 = 1, kT = 0.5, p0 = 0.9, kp = 0.12) made every s hotter than plain
top-p 0.9 sampling, so "refine" was hotter than the usual sampler and the texts were word
salad (NLL 5 nats against 2.2 for top-p 0.9). Now:

- T0 = ``temperature_base`` = 0.138, kT = ``temperature_gain`` = 6.36: T(0.3) = 0.70 (the
  refine stage samples cooler than T = 1), T(0.7) = 2.49 (the diverge stage is hot, for the
  few opening tokens the switch gives it), T(0) = 0.14 (s = 0: near-greedy), T rises
  monotonically (dT/ds = kT (1 - s) T >= 0) and clamps at TEMPERATURE_MAX = 3 from s = 0.82.
- p0 = ``nucleus_base`` = 1.0, kp = ``nucleus_gain`` = 0.0 (sp = ``nucleus_scale`` = 0.5):
  no nucleus at any s; ``min_p`` = 0.1 filters instead (min-p keeps a hot opening coherent
  where a nucleus of the flattened distribution lets the tail in). Any p0 < 1, kp > 0
  brings the nucleus back; ``nucleus_adaptation=False`` forces p = 1.
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

So stage A (diverge, s in [0.6, 0.8]) is hotter, has a nucleus at least as wide, more
experts and fewer kept attention blocks than stage B (refine, s in [0.2, 0.4]). The default
`TwoStageSchedule` spends 10% of the new tokens (6 of 60) in stage A: the opening, where a
different start pays in novelty, then refines.

The running logits processor publishes its current s (`set_current_sparsity`), and
attention patches read it (`current_sparsity`) to choose k_attn(s) for the same step.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Iterator

from ..ops.config import SparseAttentionConfig

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
        min_p: min-p filter after the temperature in every stage (keeps the tokens whose
            probability is at least ``min_p`` times the top token's; 0 disables it).
            Range [0, 1).
        simthreshd1, pvthreshd: kernel thresholds imposed with k_attn(s); None (default)
            keeps the attention config's own (the user's) values.
        cdfthreshd: None (default): attention keeps ``topk = k_attn(s)`` of the blocks.
            A float in [0, 1]: blocks are chosen by softmax mass instead, keeping
            ``1 - (1 - cdfthreshd) * (1 - k_attn(s)) / attention_sparsity`` of it (all at
            s = 0, ``cdfthreshd`` at the dial's sparsest point; `ControlPoint.cdf_mass`).
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
    min_p: float = 0.1
    simthreshd1: float | None = None
    cdfthreshd: float | None = None
    pvthreshd: float | None = None
    temperature_base: float = 0.138
    temperature_gain: float = 6.36
    nucleus_base: float = 1.0
    nucleus_gain: float = 0.0
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
        _check_float("min_p", self.min_p, 0.0, 1.0, high_open=True)
        if self.simthreshd1 is not None:
            _check_float("simthreshd1", self.simthreshd1, -1.0, 2.0)
        if self.cdfthreshd is not None:
            _check_float("cdfthreshd", self.cdfthreshd, 0.0, 1.0)
        if self.pvthreshd is not None:
            _check_float("pvthreshd", self.pvthreshd, 0.0, math.inf)
        _check_float("temperature_base", self.temperature_base, TEMPERATURE_MIN, TEMPERATURE_MAX)
        _check_float("temperature_gain", self.temperature_gain, -10.0, 10.0)
        _check_float("nucleus_base", self.nucleus_base, 0.0, 1.0, low_open=True)
        _check_float("nucleus_gain", self.nucleus_gain, -1.0, 1.0)
        _check_float("nucleus_scale", self.nucleus_scale, 0.0, 100.0, low_open=True)
        _check_float("expert_scale", self.expert_scale, 0.0, 100.0, low_open=True)

    @classmethod
    def from_stages(cls, diverge: tuple[float, float, float], refine: tuple[float, float, float],
                    **kwargs: Any) -> "SparsityConfig":
        """The config whose T(s) and p_nuc(s) pass through two stage targets, each
        ``(s, temperature, top_p)``: solves T0, kT from T(s_A) = T_A, T(s_B) = T_B and p0, kp
        from p(s_A) = p_A, p(s_B) = p_B (the seed formulas, ``nucleus_scale`` from
        ``kwargs`` or its default). ``kwargs`` set the other fields.

        Example:
            >>> cfg = SparsityConfig.from_stages((0.7, 1.5, 1.0), (0.3, 0.8, 0.9))
            >>> ctl = SparsityController(cfg)
            >>> round(ctl.temperature(0.7), 6), round(ctl.top_p(0.3), 6)
            (1.5, 0.9)
        """
        (s_a, t_a, p_a), (s_b, t_b, p_b) = diverge, refine
        s_a, s_b = _check_sparsity("diverge s", s_a), _check_sparsity("refine s", s_b)
        t_a = _check_float("diverge temperature", t_a, TEMPERATURE_MIN, TEMPERATURE_MAX)
        t_b = _check_float("refine temperature", t_b, TEMPERATURE_MIN, TEMPERATURE_MAX)
        p_a = _check_float("diverge top_p", p_a, 0.0, 1.0, low_open=True)
        p_b = _check_float("refine top_p", p_b, 0.0, 1.0, low_open=True)
        scale = kwargs.get("nucleus_scale", cls.nucleus_scale)

        def f(s: float) -> float:  # exponent of T(s) / (T0 kT)
            return s * (1.0 - s / 2.0)

        def g(s: float) -> float:  # growth of p(s) / kp
            return s * math.tanh(s / scale)

        if f(s_a) == f(s_b) and (t_a != t_b or p_a != p_b):
            raise ValueError(f"the stages need different s to have different knobs, got s = {s_a} and {s_b}")
        k_t = 0.0 if t_a == t_b else math.log(t_a / t_b) / (f(s_a) - f(s_b))
        k_p = 0.0 if p_a == p_b else (p_a - p_b) / (g(s_a) - g(s_b))
        return cls(temperature_base=t_b / math.exp(k_t * f(s_b)), temperature_gain=k_t,
                   nucleus_base=p_b - k_p * g(s_b), nucleus_gain=k_p, **kwargs)

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
        min_p: the min-p filter applied after the temperature (0 = off).
        simthreshd1, pvthreshd: kernel thresholds to impose, or None to keep the base
            config's (the user's) values.
        cdfthreshd: None (blocks chosen by ``topk = attention_budget``) or the kept
            softmax mass at the dial's sparsest point; see `attention_config`.
        attention_sparsity: the peak removed fraction of the controller (scales
            ``cdfthreshd`` with the dial).
    """

    s: float
    temperature: float
    top_p: float
    num_experts: int | None
    attention_budget: float
    min_p: float = 0.1
    simthreshd1: float | None = None
    cdfthreshd: float | None = None
    pvthreshd: float | None = None
    attention_sparsity: float = 0.5

    @property
    def is_dense(self) -> bool:
        """Whether attention keeps every block (k_attn = 1)."""
        return self.attention_budget >= 1.0

    @property
    def cdf_mass(self) -> float | None:
        """The kept softmax mass at this point when ``cdfthreshd`` is set, else None:
        ``1 - (1 - cdfthreshd) * (1 - k_attn(s)) / attention_sparsity``, so the dropped mass
        follows the dial like the dropped blocks do (none at s = 0, ``1 - cdfthreshd`` where
        k_attn is smallest)."""
        if self.cdfthreshd is None:
            return None
        if self.attention_sparsity <= 0.0:
            return 1.0
        removed = min(1.0, (1.0 - self.attention_budget) / self.attention_sparsity)
        return 1.0 - (1.0 - self.cdfthreshd) * removed

    def attention_config(self, base: SparseAttentionConfig | None = None) -> SparseAttentionConfig:
        """The kernel config for this point on top of ``base`` (default
        `SparseAttentionConfig()`): ``topk = attention_budget`` (or, with ``cdfthreshd``,
        ``cdfthreshd = cdf_mass``); ``simthreshd1`` / ``pvthreshd`` only where this point
        sets them, so the user's values in ``base`` (``pvthreshd=inf``, say) stay. A dense
        config (every block kept, no pv skip) when the budget is 1, so s = 0 equals SDPA.

        Example:
            >>> cp = SparsityController().get_sparsity_params(0.7)
            >>> round(cp.attention_config().topk, 3)
            0.5
            >>> import math
            >>> math.isinf(cp.attention_config(SparseAttentionConfig(pvthreshd=math.inf)).pvthreshd)
            True
        """
        if base is not None and not isinstance(base, SparseAttentionConfig):
            raise TypeError(f"base must be a SparseAttentionConfig or None, got {type(base).__name__}")
        base = base if base is not None else SparseAttentionConfig()
        if self.is_dense:
            return base.replace(simthreshd1=1.0, cdfthreshd=1.0, topk=None, pvthreshd=math.inf)
        changes: dict[str, Any] = {}
        if self.cdfthreshd is None:
            changes["topk"] = self.attention_budget
        else:
            changes["cdfthreshd"] = self.cdf_mass
        if self.simthreshd1 is not None:
            changes["simthreshd1"] = self.simthreshd1
        if self.pvthreshd is not None:
            changes["pvthreshd"] = self.pvthreshd
        return base.replace(**changes)


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
        (0.138, 2, 1.0)
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
        """A controller with E and K0 read from a transformers model (or config) by
        `moe.moe_layout` (its ``text_config`` too); a dense model gets K(s) = None."""
        from .moe import moe_layout  # local: moe is a leaf module, control stays import-light

        layout = moe_layout(model)
        if layout is None:
            return cls(config)
        return cls(config, num_experts=layout[0], experts_per_token=layout[1])

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

    def feasible_dial(self, compute_budget: float) -> tuple[float, float] | None:
        """The interval of s whose attention spends at most ``compute_budget`` of dense
        attention's compute (k_attn(s) <= budget), or None when no s does.

        k_attn is not monotonic, so this is not ``s >= 1 - budget``: 1 - k_attn(s) =
        ka s sqrt(1 - s^2) >= 1 - budget holds between the two roots of
        s^2 (1 - s^2) = c^2, c = (1 - budget) / ka: s^2 = (1 -+ sqrt(1 - 4 c^2)) / 2.

        Example:
            >>> lo, hi = SparsityController().feasible_dial(0.6)   # ka = 1: c = 0.4
            >>> round(lo, 4), round(hi, 4)
            (0.4472, 0.8944)
        """
        budget = _check_float("compute_budget", compute_budget, 0.0, 1.0, low_open=True)
        if budget >= 1.0:
            return (0.0, 1.0)
        if budget < ATTENTION_BUDGET_MIN:
            return None
        ka = 2.0 * self.config.attention_sparsity
        c = (1.0 - budget) / ka if ka > 0 else math.inf
        if c > 0.5:
            return None
        root = math.sqrt(max(0.0, 1.0 - 4.0 * c * c))
        return (math.sqrt((1.0 - root) / 2.0), math.sqrt((1.0 + root) / 2.0))

    def get_sparsity_params(self, s: float) -> ControlPoint:
        """M(s) = {T(s), p_nuc(s), K(s), k_attn(s)} plus the kernel thresholds.

        Args:
            s: the dial, a float in [0, 1].

        Example:
            >>> cp = SparsityController().get_sparsity_params(0.3)
            >>> round(cp.temperature, 3), cp.top_p, cp.min_p, round(cp.attention_budget, 4)
            (0.699, 1.0, 0.1, 0.7138)
        """
        s = _check_sparsity("s", s)
        c = self.config
        return ControlPoint(s=s, temperature=self.temperature(s), top_p=self.top_p(s),
                            num_experts=self.experts(s), attention_budget=self.attention_budget(s),
                            min_p=c.min_p, simthreshd1=c.simthreshd1, cdfthreshd=c.cdfthreshd,
                            pvthreshd=c.pvthreshd, attention_sparsity=c.attention_sparsity)


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
    switch: float = 0.1

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


#: The dial published by the running logits processor. A ContextVar, not a thread-local:
#: each thread, asyncio task and copied context (generators run under
#: ``contextvars.copy_context().run``) sees its own value.
_DIAL: contextvars.ContextVar[float | None] = contextvars.ContextVar("hf_creative_sparse_dial", default=None)


def current_sparsity() -> float | None:
    """The s published by the running logits processor in this context, or None."""
    return _DIAL.get()


def set_current_sparsity(s: float | None) -> None:
    """Publish the dial for attention patches in this context (None clears it)."""
    _DIAL.set(None if s is None else _check_sparsity("s", s))


@contextlib.contextmanager
def use_sparsity(s: float | None) -> Iterator[None]:
    """``with use_sparsity(0.5):`` publish s inside the block, then restore the value from
    before it (also on errors).

    Example:
        >>> with use_sparsity(0.5):
        ...     current_sparsity()
        0.5
        >>> current_sparsity() is None
        True
    """
    token = _DIAL.set(None if s is None else _check_sparsity("s", s))
    try:
        yield
    finally:
        _DIAL.reset(token)
