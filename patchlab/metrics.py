"""Metrics on the final position's logits, with units.

A metric maps final-position logits ``[batch, vocab]`` and per-row targets to one
value per row ``[batch]``. Metrics are torch-only, so they can run inside a trace
(locally or on a remote server). Answers may be sets (``PromptPair(correct=(" I", " As"))``):
a set's logit is the logsumexp of its tokens' logits, its probability their sum. A user function
``f(logits [batch, vocab], targets) -> [batch]`` is a metric too (`MetricFunction`).
Sources: Zhang & Nanda 2023, "Towards Best Practices of Activation Patching" (arXiv
2309.16042) recommend the logit difference; probability hides negative components.

Normalised patching score (Heimersheim & Nanda 2024, arXiv 2404.15255), computed
on means over prompts:

- denoising (clean activation into the corrupted run), 1 = full recovery::

      score = (m_patched - m_corrupted) / (m_clean - m_corrupted)

- noising (corrupted activation into the clean run), 1 = the behaviour is fully
  destroyed, so in both directions a large score marks an important component::

      score = (m_clean - m_patched) / (m_clean - m_corrupted)

Before any sweep, patchlab checks that the gap ``m_clean - m_corrupted`` can be divided by
(`check_gap`): a zero, tiny or cancelling gap raises `BaselineGapError` instead of writing
NaN, infinite or noise scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._choices import Choice
from .kernels import common as K

__all__ = ["Metric", "MetricFunction", "Targets", "Direction", "get_metric", "score_formula", "normalised_score",
           "BaselineGapError",
           "check_gap"]


class Direction(Choice):
    """Which run is patched into which."""

    DENOISING = "denoising"
    """Clean activations patched into the corrupted run: is the component sufficient?"""
    NOISING = "noising"
    """Corrupted activations patched into the clean run: is the component necessary?"""


@dataclass(frozen=True, kw_only=True)
class Targets:
    """What a metric compares against, one row per batch row.

    Attributes:
        correct: correct answer token ids, ``[batch]``, or ``[batch, answer]`` for answer sets
            (padded with -1).
        incorrect: incorrect answer token ids, likewise.
        clean_logprobs: log-probabilities of the clean run at the final position,
            ``[batch, vocab]``; needed by the KL metric only.
    """

    correct: torch.Tensor
    incorrect: torch.Tensor
    clean_logprobs: torch.Tensor | None = None

    def repeat(self, n: int) -> "Targets":
        """Targets for a batch made of `n` copies of the prompts (row = copy * n_prompts + prompt)."""
        t = K.repeat_targets({"correct": self.correct, "incorrect": self.incorrect,
                              "clean_logprobs": self.clean_logprobs}, n)
        return Targets(**t)


class Metric(Choice):
    """A metric of the final position's logits. Call it: ``Metric.LOGIT_DIFF(logits, targets)``."""

    LOGIT_DIFF = "logit_diff"
    """Correct minus incorrect answer logit, in nats (a log-odds ratio); for answer sets,
    logsumexp of the correct logits minus logsumexp of the incorrect ones."""
    LOGPROB = "logprob"
    """Log-probability of the correct answer (set), in nats."""
    PROB = "prob"
    """Probability of the correct answer (the sum over a set)."""
    KL = "kl"
    """KL(clean || patched) of the next-token distributions, in nats; 0 on the clean run."""
    LOG_ODDS = "log_odds"
    """log P(correct) - log(1 - P(correct)), in nats: Arditi et al. 2024's refusal score with the
    refusal openers as the correct set (arXiv 2406.11717)."""

    @property
    def units(self) -> str:
        return "probability" if self is Metric.PROB else "nats"

    @property
    def formula(self) -> str:
        """The metric's formula, as recorded in result attrs."""
        return _FORMULAS[self]

    @property
    def spec(self) -> str:
        """What a kernel program receives: the name."""
        return self.value

    def __call__(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Metric per row, ``[batch]``, from final-position logits ``[batch, vocab]``."""
        if self is Metric.KL and targets.clean_logprobs is None:
            raise ValueError("the KL metric needs Targets.clean_logprobs")
        return K.metric(self.value, logits, {"correct": targets.correct, "incorrect": targets.incorrect,
                                             "clean_logprobs": targets.clean_logprobs})


_FORMULAS = {
    Metric.LOGIT_DIFF: "logsumexp(logits[correct]) - logsumexp(logits[incorrect]) at the final position "
                       "(correct minus incorrect logit for single answers), nats",
    Metric.LOGPROB: "logsumexp(log_softmax(logits)[correct]) at the final position, nats",
    Metric.PROB: "sum(softmax(logits)[correct]) at the final position, probability",
    Metric.KL: "sum(p_clean * (log p_clean - log p)) over the vocabulary at the final position, nats",
    Metric.LOG_ODDS: "log P(correct) - log(1 - P(correct)), P(correct) = sum(softmax(logits)[correct]) at the "
                     "final position, nats",
}


@dataclass(frozen=True)
class MetricFunction:
    """A user metric: ``fn(logits, targets) -> [batch]``.

    ``logits`` are the final position's, ``[batch, vocab]`` (in at least float32); ``targets`` a
    dict of ``correct`` and ``incorrect`` token ids (``[batch]``, or ``[batch, answer]`` padded with
    -1 for answer sets) and ``clean_logprobs`` (``[batch, vocab]``). Torch-only code, so it can
    travel to a remote server (a function of ``__main__`` or of a module patchlab registers for
    that, `patchlab.remote`). It must be differentiable for attribution patching (EAP).

    Attributes:
        fn: the function; name: its name in results (default ``fn.__name__``); units: of its values.
    """

    fn: Callable
    name: str = ""
    units: str = "custom"

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"a metric function must be callable, got {self.fn!r}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "metric"))

    @property
    def value(self) -> str:
        return self.name

    @property
    def formula(self) -> str:
        doc = (getattr(self.fn, "__doc__", None) or "").strip().splitlines()
        where = f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', self.name)}"
        return f"user function {where}" + (f": {doc[0]}" if doc else "")

    @property
    def spec(self) -> Callable:
        """What a kernel program receives: the function itself."""
        return self.fn

    def __call__(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        return K.metric(self.fn, logits, {"correct": targets.correct, "incorrect": targets.incorrect,
                                          "clean_logprobs": targets.clean_logprobs})

    def check(self, vocab_size: int, targets: Targets) -> None:
        """Call the function on random logits for two rows and refuse a result that is not ``[2]``.

        Raises:
            ValueError: the function failed, or returned the wrong shape; the message says what it must return.
        """
        n = min(2, int(targets.correct.shape[0]))
        logits = torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(0))
        t = Targets(correct=targets.correct[:n], incorrect=targets.incorrect[:n],
                    clean_logprobs=torch.log_softmax(logits, -1))
        try:
            out = self(logits, t)
        except Exception as error:
            raise ValueError(f"the metric function {self.name!r} failed on logits [{n}, {vocab_size}]: "
                             f"{type(error).__name__}: {error}. It is called as fn(logits [batch, vocab], targets) "
                             "with targets a dict of 'correct', 'incorrect' and 'clean_logprobs'") from error
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the metric function {self.name!r} returned {shape} for logits [{n}, {vocab_size}]; "
                             f"it must return a tensor of one value per row, [batch] = ({n},)")


def get_metric(metric: "Metric | str | Callable") -> "Metric | MetricFunction":
    """A `Metric` from itself or its name ("logit_diff", "logprob", "prob", "kl", "log_odds"), or a
    `MetricFunction` from a function.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if isinstance(metric, (Metric, MetricFunction)):
        return metric
    if callable(metric) and not isinstance(metric, str):
        return MetricFunction(metric)
    return Metric(metric)


def score_formula(direction: Direction) -> str:
    """The normalised-score formula for a direction, as recorded in result attrs."""
    if direction is Direction.DENOISING:
        return "(m_patched - m_corrupted) / (m_clean - m_corrupted), means over prompts; 1 = full recovery"
    return "(m_clean - m_patched) / (m_clean - m_corrupted), means over prompts; 1 = behaviour destroyed"


def normalised_score(patched, clean, corrupted, direction: Direction):
    """Normalised score from prompt-mean metric values (works on tensors, numpy and xarray)."""
    gap = clean - corrupted
    return (patched - corrupted) / gap if direction is Direction.DENOISING else (clean - patched) / gap


class BaselineGapError(ValueError):
    """The clean and corrupted runs (or the full model and the empty circuit) give nearly the
    same mean metric, so scores normalised by their gap would be NaN, infinite or noise."""


def check_gap(clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
              names: tuple[str, str] = ("clean", "corrupted")) -> None:
    """Refuse two runs whose metrics (``[prompt]`` each) leave no gap to normalise by: a mean
    gap below `patchlab.kernels.common.MIN_GAP` (1e-6 metric units), or below
    `~patchlab.kernels.common.MIN_GAP_FRACTION` (1%) of the mean per-prompt gap (pairs whose
    gaps cancel). Kernel programs apply the same rule (`~patchlab.kernels.common.gap_too_small`)
    and stop before their sweep.

    Raises:
        BaselineGapError: the message gives both means, the per-prompt gaps and the fix.
    """
    if not K.gap_too_small(clean, corrupted):
        return
    a, b = clean.double().cpu(), corrupted.double().cpu()
    d = a - b
    spread = f"per-prompt gaps from {float(d.min()):+.4g} to {float(d.max()):+.4g}"
    if float(d.abs().max()) < K.MIN_GAP:
        why = "identical runs"
    elif float(d.abs().mean()) >= K.MIN_GAP:
        why = f"the prompts' gaps cancel: {spread}"
    else:
        why = "almost identical runs"
    raise BaselineGapError(
        f"the {names[0]} and {names[1]} runs give mean {metric.value} {float(a.mean()):+.6g} and "
        f"{float(b.mean()):+.6g} {metric.units}: a gap of {float(d.mean()):+.3g} ({why}), too small to normalise "
        f"patching scores by (at least {K.MIN_GAP:g} {metric.units} and {K.MIN_GAP_FRACTION:.0%} of the mean "
        "per-prompt |gap| are needed). Fix: make the corrupted prompts change what the task needs (they may equal "
        "the clean ones), check that the correct and incorrect answers differ for this tokenizer, or split pairs "
        "whose effects point opposite ways into separate datasets")
