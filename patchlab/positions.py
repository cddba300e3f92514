"""Token positions of left-padded prompts: where each prompt's tokens sit in its batch, and what a
component's positions mean for each prompt.

Prompts of different lengths are left-padded to one width ``W``: prompt ``p`` of ``n_p`` tokens
fills the columns ``W - n_p .. W - 1``. A position of a `patchlab.Component` is, per prompt:

- an offset ``-k``: column ``W - k``, the prompt's ``k``-th token from the end (aligned from the
  end, which suits chat templates: ``-1`` is the last token);
- a name ("S2"): that prompt's own index of the name (`patchlab.PromptPair.positions`, per pair;
  the corrupted prompt's from ``corrupted_positions``);
- an index ``i >= 0``: the prompt's own token ``i`` (aligned from the start; with prompts of one
  length, column ``i``).

`RunPositions` holds one run's lengths and names; `PromptPositions` every run's (``clean``,
``corrupted``). With prompts of one length and names shared by all, every prompt resolves alike
and nothing here changes what a sweep computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["RunPositions", "PromptPositions", "ALIGNMENT_HELP"]

ALIGNMENT_HELP = ("give positions that say which tokens correspond: offsets from the end (pos=-1, or "
                  "range(-3, 0) for a chat template's last tokens), or names the pairs define (PromptPair(..., "
                  "positions={...}, corrupted_positions={...})); or pair prompts of equal token lengths "
                  "(pl.chat_pairs(..., match_lengths=True))")
"""How to align tokens between prompts of different lengths (for error messages)."""


@dataclass(frozen=True, eq=False)
class RunPositions:
    """One run's prompts in their left-padded batch.

    Attributes:
        lengths: real tokens per prompt, ``[prompt]`` int64.
        width: the padded length ``W`` (the ``pos`` dim of the batch).
        names: each named position's index per prompt, in the prompt's own tokens, ``{name: [prompt]}``.
    """

    lengths: torch.Tensor
    width: int
    names: Mapping[str, torch.Tensor]

    @classmethod
    def uniform(cls, n_prompts: int, n_pos: int, names: Mapping[str, int] | None = None) -> "RunPositions":
        """Prompts of one length `n_pos`, no padding, the same `names` in each."""
        return cls(lengths=torch.full((n_prompts,), n_pos, dtype=torch.long), width=n_pos,
                   names={k: torch.full((n_prompts,), int(v), dtype=torch.long) for k, v in (names or {}).items()})

    @property
    def n_prompts(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def padded(self) -> bool:
        """Whether some prompt is shorter than the batch (left-padded)."""
        return bool((self.lengths != self.width).any())

    def real(self) -> torch.Tensor:
        """True on real tokens, ``[prompt, pos]``."""
        return torch.arange(self.width)[None, :] >= (self.width - self.lengths)[:, None]

    def columns(self, position: int | str, label: str, run: str) -> torch.Tensor:
        """Each prompt's batch column of `position` (an index, an offset from the end or a name), ``[prompt]``.

        Raises:
            ValueError: a name the prompts do not have (the message lists the names), or a position
                beyond some prompt's length (the message names the prompt and its length).
        """
        start = self.width - self.lengths
        if isinstance(position, str):
            if position not in self.names:
                raise ValueError(f"{label}: {position!r} is not a named position of this dataset; its names are "
                                 f"{sorted(self.names)} (or give an index, or -1 for the last token)")
            return start + self.names[position]
        if position < 0:
            bad = torch.nonzero(self.lengths < -position).flatten()
            if len(bad):
                p = int(bad[0])
                raise ValueError(f"{label}: offset {position} from the end is beyond {run} prompt {p}, which has "
                                 f"{int(self.lengths[p])} tokens (offsets -{int(self.lengths[p])}..-1); use offsets "
                                 "every prompt reaches, or names")
            return torch.full_like(self.lengths, self.width + position)
        bad = torch.nonzero(self.lengths <= position).flatten()
        if len(bad):
            p = int(bad[0])
            raise ValueError(f"{label}: position {position} is beyond {run} prompt {p}, which has "
                             f"{int(self.lengths[p])} tokens (indices 0..{int(self.lengths[p]) - 1})")
        return start + position


@dataclass(frozen=True, eq=False)
class PromptPositions:
    """Every run's `RunPositions` (``{"clean": ..., "corrupted": ...}``), all of one width."""

    runs: Mapping[str, RunPositions]

    @classmethod
    def uniform(cls, run_names: Sequence[str], n_prompts: int, n_pos: int,
                names: Mapping[str, int] | None = None) -> "PromptPositions":
        """Prompts of one length and shared `names`, in every run of `run_names`."""
        one = RunPositions.uniform(n_prompts, n_pos, names)
        return cls(runs={name: one for name in run_names})

    def __getitem__(self, run: str) -> RunPositions:
        return self.runs[run]

    @property
    def width(self) -> int:
        return next(iter(self.runs.values())).width

    @property
    def padded(self) -> bool:
        return any(r.padded for r in self.runs.values())

    def shared(self) -> dict[str, int] | None:
        """The names as batch columns when every prompt of every run has each at the same column
        (e.g. one IOI template), else None."""
        out = {}
        for run in self.runs.values():
            for name, index in run.names.items():
                cols = (run.width - run.lengths + index).unique()
                if len(cols) != 1 or out.setdefault(name, int(cols[0])) != int(cols[0]):
                    return None
        return out

    def with_run(self, name: str, like: str) -> "PromptPositions":
        """The same positions with run `name` laid out like run `like` (a run made from its tokens)."""
        return PromptPositions(runs={**self.runs, name: self.runs[like]})
