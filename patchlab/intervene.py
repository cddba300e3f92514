"""Your own experiments: joint sets of interventions, run on a prompt-pair dataset.

Three forms, one engine (`patchlab.runner.run_rows`, the engine of every node-level sweep):

- `run_interventions`: one joint set (`patchlab.interventions`), applied to the base run;
  edge-level sets (`PatchEdge`) run on `patchlab.graph_runner` instead;
- `sweep_interventions`: many labelled joint sets (rows) in one program, batched and chunked
  like the built-in sweeps (one request remotely);
- `trace`: a ``with`` block that declares interventions in any order (``t.patch(...)``,
  ``t.ablate(...)``, ...; ``t.at(component, fn)`` for a function of the value) and runs them on
  exit; ``t.result`` is `run_interventions`' Dataset.

Interventions are applied in forward order inside one nnsight trace per chunk, whatever order
they were declared in, so nnsight 0.8's rule that values are read and written in forward order
(``OutOfOrderError``) never reaches the user; within one component they combine as
`patchlab.interventions` says.

Results (``xarray.Dataset``):

- ``patched`` (``[row,] prompt``): the metric with the interventions, in the metric's units;
- ``clean``, ``corrupted`` (``prompt``): the runs without interventions;
- ``score`` (``[row]``): normalised on prompt means: with ``base="corrupted"``
  ``(m_patched - m_corrupted) / (m_clean - m_corrupted)`` (1: the clean behaviour is restored),
  with ``base="clean"`` ``(m_clean - m_patched) / (m_clean - m_corrupted)`` (1: it is destroyed);
- attrs: provenance, ``metric``, ``units``, ``metric_formula``, ``base_run`` and the interventions as
  JSON (``interventions``: ``{row label: [intervention, ...]}``, each `Intervention.to_json`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
import xarray as xr

from .components import Component
from .data import PromptPairDataset
from .graph import Graph
from .graph_runner import edge_patch_rows
from .interventions import (Ablate, At, Freeze, Intervention, Patch, PatchEdge, ProjectOut, Run, Scale, Steer,
                            joint_set)
from .metrics import Direction, Metric, get_metric
from .models import PatchModel, takes_model
from .patching import pair_targets, result_dataset, run_pair, tokenize_for
from .runner import run_rows

__all__ = ["run_interventions", "sweep_interventions", "trace", "InterventionTrace"]


@takes_model
def sweep_interventions(model: PatchModel, dataset: PromptPairDataset,
                        rows: Mapping[str, Sequence[Intervention]] | Sequence[Sequence[Intervention]], *,
                        base: Run | str = Run.CORRUPTED, metric: Metric | str | Callable = Metric.LOGIT_DIFF,
                        seed: int | None = None, progress: bool = True, memory_mb: float = 1024,
                        remote=None) -> xr.Dataset:
    """Evaluate many joint sets of interventions, one per row, in one program.

    Args:
        rows: ``{label: joint set}``, or a list of joint sets (labelled by their interventions'
            labels joined with ``" + "``). A joint set is a list or tuple of interventions.
        base: the run intervened on, ``"corrupted"`` (denoising-style) or ``"clean"``
            (noising-style).
        metric: a `Metric`, its name, or a function ``f(logits [batch, vocab], targets) -> [batch]``
            (`patchlab.metrics.MetricFunction`).
        seed: recorded in attrs (the seed that generated `dataset`).
        memory_mb: activation memory per forward pass, which sets the rows per chunk.
        remote: run on a hosted model (NDIF); the whole sweep is one request.

    Returns:
        Dataset with ``patched`` (row, prompt), ``score`` (row), ``clean`` and ``corrupted``
        (prompt); the ``row`` coordinate holds the labels.

    Raises:
        TypeError: a row that is not a list of interventions.
        ValueError: duplicate labels, an unknown position name, conflicting interventions, a
            steering vector of the wrong size, a metric function of the wrong shape, or a
            component the model does not have.
        patchlab.metrics.BaselineGapError: the clean and corrupted runs leave no gap to normalise by.
    """
    labels, sets = _labelled(rows)
    base, metric = Run(base), get_metric(metric)
    tokens = tokenize_for(model, dataset)
    direction = Direction.DENOISING if base is Run.CORRUPTED else Direction.NOISING
    if _edge_level(sets):
        values, baselines = _run_edges(model, tokens, sets, base, metric, direction, memory_mb, progress, remote)
    else:
        result = run_rows(model, passes=[run_pair(tokens)], base=base.value,
                          base_ids=tokens.corrupted_ids if base is Run.CORRUPTED else tokens.clean_ids,
                          rows=sets, metric=metric, targets=pair_targets(tokens), positions=tokens.run_positions(),
                          memory_mb=memory_mb, progress=progress, remote=remote, gap=("clean", "corrupted"))
        values, baselines = result.values, {"metric": metric, "direction": direction, **result.runs}
    described = json.dumps({label: [i.to_json() for i in s] for label, s in zip(labels, sets)})
    return result_dataset(model, dataset, tokens, baselines, values, ("row",), {"row": labels},
                          "mixed", seed, base_run=base.value, interventions=described)


@takes_model
def run_interventions(model: PatchModel, dataset: PromptPairDataset, interventions: Sequence[Intervention], *,
                      base: Run | str = Run.CORRUPTED, metric: Metric | str | Callable = Metric.LOGIT_DIFF,
                      seed: int | None = None, remote=None) -> xr.Dataset:
    """Apply one joint set of interventions to the base run and measure.

    Args:
        interventions: a list or tuple of `patchlab.interventions` values (or one of them).
        (other args as in `sweep_interventions`)

    Returns:
        Dataset with ``patched`` (prompt), ``score`` (a scalar), ``clean`` and ``corrupted``
        (prompt); attrs ``interventions`` (JSON list) and ``labels``.

    Raises:
        as `sweep_interventions`.
    """
    interventions = joint_set(interventions)
    ds = sweep_interventions(model, dataset, {"joint": interventions}, base=base, metric=metric, seed=seed,
                             progress=False, remote=remote)
    ds = ds.isel(row=0, drop=True)
    ds.attrs["interventions"] = json.dumps([i.to_json() for i in interventions])
    ds.attrs["labels"] = json.dumps([i.label for i in interventions])
    return ds


class InterventionTrace:
    """The interventions declared in a `trace` block, and its ``result`` after the block."""

    def __init__(self) -> None:
        self.interventions: list[Intervention] = []
        self.result: xr.Dataset | None = None

    def add(self, intervention: Intervention) -> Intervention:
        """Declare any intervention value; returns it."""
        self.interventions.extend(joint_set(intervention))
        return intervention

    def patch(self, component: Component, source: Run | str = Run.CLEAN) -> Intervention:
        """`patchlab.interventions.Patch`: take the component's value from the `source` run."""
        return self.add(Patch(component, source))

    def ablate(self, component: Component, how: str = "zero", seed: int | None = None) -> Intervention:
        """`patchlab.interventions.Ablate`: zero, mean or resample ablation."""
        return self.add(Ablate(component, how, seed))

    def steer(self, component: Component, vector: torch.Tensor, scale: float = 1.0) -> Intervention:
        """`patchlab.interventions.Steer`: add ``scale * vector``."""
        return self.add(Steer(component, vector, scale))

    def project_out(self, component: Component, direction: torch.Tensor) -> Intervention:
        """`patchlab.interventions.ProjectOut`: remove a direction, ``x - (x . r) r``."""
        return self.add(ProjectOut(component, direction))

    def scale(self, component: Component, factor: float) -> Intervention:
        """`patchlab.interventions.Scale`: multiply by `factor`."""
        return self.add(Scale(component, factor))

    def freeze(self, component: Component) -> Intervention:
        """`patchlab.interventions.Freeze`: keep the base run's own value."""
        return self.add(Freeze(component))

    def at(self, component: Component, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Intervention:
        """`patchlab.interventions.At`: call ``fn`` on the component's value (``[prompt, n_pos, d]``)
        inside the trace, after the other interventions on it; it may edit it in place, return a
        replacement, or keep a clone."""
        return self.add(At(component, fn))


@contextmanager
def trace(model: PatchModel, dataset: PromptPairDataset, *, base: Run | str = Run.CORRUPTED,
          metric: Metric | str | Callable = Metric.LOGIT_DIFF, seed: int | None = None,
          remote=None) -> Iterator[InterventionTrace]:
    """Declare interventions in a ``with`` block, in any order; they run, in forward order in one
    trace, when the block ends, and ``t.result`` holds `run_interventions`' Dataset::

        with pl.trace(model, dataset, base="corrupted") as t:
            t.patch(pl.Component(site="resid_pre", layer=10, pos="S2"), source="clean")
            t.ablate(pl.Component(site="head", layer=23, head=3), how="mean")
        t.result.score

    Nothing runs if the block raises. Raises as `run_interventions` (also for an empty block).
    """
    t = InterventionTrace()
    yield t
    t.result = run_interventions(model, dataset, t.interventions, base=base, metric=metric, seed=seed,
                                 remote=remote)


def _edge_level(sets) -> bool:
    """Whether the rows are edge-level (`PatchEdge` only), refusing a mix with node-level ones."""
    kinds = {isinstance(i, PatchEdge) for s in sets for i in s}
    if len(kinds) > 1:
        raise ValueError("these rows mix edge interventions (PatchEdge) with node-level ones: edge and node "
                         "interventions run on different engines (patchlab.graph_runner and patchlab.runner), so a "
                         "sweep holds one kind; run them as two sweeps")
    return kinds == {True}


def _run_edges(model, tokens, sets, base: Run, metric, direction: Direction, memory_mb, progress, remote):
    """Edge-level rows on `patchlab.graph_runner.edge_patch_rows`: every edge of the sweep carries the
    other run's values (mean or not: one setting per sweep)."""
    sources = {(i.source, i.mean) for s in sets for i in s}
    other = Run.CLEAN if base is Run.CORRUPTED else Run.CORRUPTED
    if len(sources) > 1 or next(iter(sources))[0] is not other:
        raise ValueError(f"an edge sweep on the {base.value} run patches every edge from the {other.value} run, "
                         f"all with mean=True or all with mean=False; got {sorted((s.value, m) for s, m in sources)}. "
                         f"Use base={other.value!r} for the other source, and one sweep per setting")
    result = edge_patch_rows(model, Graph.from_model(model), tokens=tokens, rows=[[i.edge for i in s] for s in sets],
                             metric=metric, direction=direction, ablation="mean" if sources.pop()[1] else "resample",
                             memory_mb=memory_mb, progress=progress, remote=remote)
    return result.values, result.baselines


def _labelled(rows) -> tuple[list[str], list[tuple[Intervention, ...]]]:
    if isinstance(rows, Mapping):
        labels = [str(label) for label in rows]
        sets = [joint_set(s) for s in rows.values()]
    elif isinstance(rows, (str, set, frozenset)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a mapping {{label: joint set}} or a list of joint sets, got a "
                        f"{type(rows).__name__}")
    else:
        sets = [joint_set(s) for s in rows]
        labels = [" + ".join(i.label for i in s) for s in sets]
    if not sets:
        raise ValueError("rows is empty; give at least one joint set of interventions")
    if len(set(labels)) != len(labels):
        duplicate = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"two rows have the label {duplicate!r}; labels are the row coordinate and must differ")
    return labels, sets
