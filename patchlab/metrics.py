"""Metrics on the final position's logits, with units.

A metric maps final-position logits ``[batch, vocab]`` and per-row targets to one
value per row ``[batch]``. Metrics are torch-only, so they can run inside a trace
(locally or on a remote server). Sources: Zhang & Nanda 2023, "Towards Best
Practices of Activation Patching" (arXiv 2309.16042) recommend the logit
difference; probability hides negative components.

Normalised patching score (Heimersheim & Nanda 2024, arXiv 2404.15255), computed
on means over prompts:

- denoising (clean activation into the corrupted run), 1 = full recovery::

      score = (m_patched - m_corrupted) / (m_clean - m_corrupted)

- noising (corrupted activation into the clean run), 1 = the behaviour is fully
  destroyed, so in both directions a large score marks an important component::

      score = (m_clean - m_patched) / (m_clean - m_corrupted)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .kernels import common as K

__all__ = ["Metric", "Targets", "Direction", "get_metric", "score_formula", "normalised_score"]


class Direction(enum.Enum):
    """Which run is patched into which."""

    DENOISING = "denoising"
    """Clean activations patched into the corrupted run: is the component sufficient?"""
    NOISING = "noising"
    """Corrupted activations patched into the clean run: is the component necessary?"""


@dataclass(frozen=True, kw_only=True)
class Targets:
    """What a metric compares against, one row per batch row.

    Attributes:
        correct: correct answer token ids, ``[batch]``.
        incorrect: incorrect answer token ids, ``[batch]``.
        clean_logprobs: log-probabilities of the clean run at the final position,
            ``[batch, vocab]``; needed by the KL metric only.
    """

    correct: torch.Tensor
    incorrect: torch.Tensor
    clean_logprobs: torch.Tensor | None = None

    def repeat(self, n: int) -> "Targets":
        """Targets for a batch made of `n` copies of the prompts (row = copy * n_prompts + prompt)."""
        lp = None if self.clean_logprobs is None else self.clean_logprobs.repeat(n, 1)
        return Targets(correct=self.correct.repeat(n), incorrect=self.incorrect.repeat(n), clean_logprobs=lp)


class Metric(enum.Enum):
    """A metric of the final position's logits. Call it: ``Metric.LOGIT_DIFF(logits, targets)``."""

    LOGIT_DIFF = "logit_diff"
    """Correct minus incorrect answer logit, in nats (a log-odds ratio)."""
    LOGPROB = "logprob"
    """Log-probability of the correct answer, in nats."""
    PROB = "prob"
    """Probability of the correct answer."""
    KL = "kl"
    """KL(clean || patched) of the next-token distributions, in nats; 0 on the clean run."""

    @property
    def units(self) -> str:
        return "probability" if self is Metric.PROB else "nats"

    def __call__(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Metric per row, ``[batch]``, from final-position logits ``[batch, vocab]``."""
        if self is Metric.KL and targets.clean_logprobs is None:
            raise ValueError("the KL metric needs Targets.clean_logprobs")
        return K.metric(self.value, logits, {"correct": targets.correct, "incorrect": targets.incorrect,
                                             "clean_logprobs": targets.clean_logprobs})


def get_metric(metric: "Metric | str") -> Metric:
    """A `Metric` from itself or its name ("logit_diff", "logprob", "prob", "kl").

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    try:
        return Metric(metric)
    except ValueError:
        names = ", ".join(repr(m.value) for m in Metric)
        raise ValueError(f"unknown metric {metric!r}; choose one of {names}") from None


def score_formula(direction: Direction) -> str:
    """The normalised-score formula for a direction, as recorded in result attrs."""
    if direction is Direction.DENOISING:
        return "(m_patched - m_corrupted) / (m_clean - m_corrupted), means over prompts; 1 = full recovery"
    return "(m_clean - m_patched) / (m_clean - m_corrupted), means over prompts; 1 = behaviour destroyed"


def normalised_score(patched, clean, corrupted, direction: Direction):
    """Normalised score from prompt-mean metric values (works on tensors, numpy and xarray)."""
    gap = clean - corrupted
    return (patched - corrupted) / gap if direction is Direction.DENOISING else (clean - patched) / gap
