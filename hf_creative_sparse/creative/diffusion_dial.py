"""The creative dial over the denoising steps of a diffusion LM.

An autoregressive model moves the dial over new tokens (`CreativeSparseLogitsProcessor`);
a block-diffusion model refines a whole canvas over denoising steps, so here the dial
follows the denoising progress of each canvas: stage A (diverge, high s: hot temperature
T(s), wide nucleus p_nuc(s), with the controller's pruning and min-p: the package's
`control_warpers`) in the early steps, stage B (refine, low s) late, restarting
with every canvas. The processor also publishes the s of the next step
(`control.set_current_sparsity`), which context KV retention follows (``follow_dial``:
the retained share at a selection is ``retention_ratio * k_attn(s)``).

DiffusionGemma's ``generate`` calls its logits processors as
``processor(input_ids, scores, cur_step=...)`` with ``cur_step`` counting down from
``max_denoising_steps`` to 1 and scores of shape (batch, canvas, vocab). Its own linear
temperature schedule (``t_min``/``t_max``, on by default) would stack on top: pass
``**processor.generate_kwargs()`` (sets them to None and the step count).

    proc = DiffusionDialProcessor(max_denoising_steps=48)
    model.generate(input_ids=ids, logits_processor=LogitsProcessorList([proc]), **proc.generate_kwargs())

Example:
    >>> import torch
    >>> from hf_creative_sparse.creative.control import SparsityConfig
    >>> proc = DiffusionDialProcessor(max_denoising_steps=4, schedule=TwoStageSchedule(0.7, 0.3, switch=0.5),
    ...                               controller=SparsityController(SparsityConfig(temperature_base=1.0)))
    >>> [proc.s_at_step(i) for i in range(4)]
    [0.7, 0.7, 0.3, 0.3]
    >>> out = proc(torch.zeros(1, 3, dtype=torch.long), torch.randn(1, 2, 10), cur_step=4)  # first step
    >>> proc.history[-1]["temperature"] == proc.controller.temperature(0.7)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessor

from .control import ControlPoint, SparsityController, TwoStageSchedule, current_sparsity, set_current_sparsity
from .processor import control_warpers

__all__ = ["DiffusionDialProcessor"]


class DiffusionDialProcessor(LogitsProcessor):
    """T(s) and p_nuc(s) of the two-stage schedule over the denoising steps of each canvas.

    Args:
        max_denoising_steps: the steps per canvas ``generate`` runs (its
            ``max_denoising_steps``); step i (0-based) has progress i / max_denoising_steps.
        schedule: the `TwoStageSchedule` (default: diverge 0.7, refine 0.3, switch 0.5).
        controller: the `SparsityController` giving T(s), p_nuc(s), k_attn(s).
        publish: publish the s of the next step for retention (and any dial follower).

    Attributes:
        history: one dict per call: step, s, temperature, top_p.
    """

    def __init__(self, max_denoising_steps: int, *, schedule: TwoStageSchedule | None = None,
                 controller: SparsityController | None = None, publish: bool = True) -> None:
        if isinstance(max_denoising_steps, bool) or not isinstance(max_denoising_steps, int) or max_denoising_steps < 1:
            raise ValueError(f"max_denoising_steps must be a positive int, got {max_denoising_steps!r}")
        if schedule is not None and not isinstance(schedule, TwoStageSchedule):
            raise TypeError(f"schedule must be a TwoStageSchedule or None, got {type(schedule).__name__}")
        if controller is not None and not isinstance(controller, SparsityController):
            raise TypeError(f"controller must be a SparsityController or None, got {type(controller).__name__}")
        if not isinstance(publish, bool):
            raise TypeError(f"publish must be a bool, got {type(publish).__name__}")
        self.max_denoising_steps = max_denoising_steps
        self.schedule = schedule if schedule is not None else TwoStageSchedule()
        self.controller = controller if controller is not None else SparsityController()
        self.publish = publish
        self.history: list[dict[str, Any]] = []
        self._saved: float | None = None

    def s_at_step(self, step: int) -> float:
        """The dial at denoising step ``step`` (0-based) of a canvas."""
        return self.schedule.s_at(min(step, self.max_denoising_steps) / self.max_denoising_steps)

    def control_at_step(self, step: int) -> ControlPoint:
        return self.controller.get_sparsity_params(self.s_at_step(step))

    def __enter__(self) -> "DiffusionDialProcessor":
        """``with processor:`` restores the dial published before it on exit (a pipeline
        or a bare loop; ``generate`` on a model with retention enabled does it by itself)."""
        self._saved = current_sparsity()
        return self

    def __exit__(self, *exc: Any) -> None:
        set_current_sparsity(self._saved)

    def generate_kwargs(self) -> dict[str, Any]:
        """``generate`` keywords that leave the temperature to this processor."""
        return {"t_min": None, "t_max": None, "max_denoising_steps": self.max_denoising_steps}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, cur_step: Any = None) -> torch.Tensor:
        if cur_step is None:
            raise ValueError("DiffusionDialProcessor needs cur_step (DiffusionGemma's generate passes it); "
                             "got None")
        remaining = int(cur_step)
        if not 1 <= remaining <= self.max_denoising_steps:
            raise ValueError(f"cur_step must be in [1, max_denoising_steps={self.max_denoising_steps}], "
                             f"got {remaining}; "
                             "was the processor built with generate's max_denoising_steps?")
        step = self.max_denoising_steps - remaining
        cp = self.control_at_step(step)
        vocab = scores.shape[-1]
        # the package's warpers (T(s), pruning, p_nuc(s), min-p) over each canvas token's row
        warpers = control_warpers(cp, vocab, self.controller.config.token_pruning_rate)
        scores = warpers(input_ids, scores.reshape(-1, vocab)).view(scores.shape)
        self.history.append({"step": step, "s": cp.s, "temperature": cp.temperature, "top_p": cp.top_p})
        if self.publish:  # the next forward: the next step, or step 0 of the next canvas
            set_current_sparsity(self.s_at_step(step + 1 if step + 1 < self.max_denoising_steps else 0))
        return scores
