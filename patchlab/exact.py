"""Exact edge scores: patch every edge on its own, batched; the reference for attribution.

``score(s -> r.c) = m(base with the one edge patched) - m(base)``, averaged over
prompts, in the metric's units: the quantity `patchlab.eap` and `patchlab.eap_ig`
estimate to first order. Edge patching is defined in `patchlab.graph_runner`; every
row of the batch patches one edge and skips the blocks below its sender.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ._io import atomic_path
from .circuit import edge_scores, score_attrs
from .data import PromptPairDataset
from .graph import Edge, Graph
from .graph_runner import edge_patch_rows, graph_cache_sites
from .metrics import Direction, Metric
from .models import PatchModel
from .patching import prepare_runs, tokenize_for

__all__ = ["exact_edge_scores"]


def exact_edge_scores(model: PatchModel, dataset: PromptPairDataset, *, edges: Iterable[Edge] | None = None,
                      metric: Metric | str = Metric.LOGIT_DIFF, direction: Direction | str = Direction.NOISING,
                      per_position: bool = False, seed: int | None = None, block: int = 512,
                      checkpoint: str | os.PathLike | None = None, progress: bool = True,
                      memory_mb: float = 1024) -> xr.Dataset:
    """Exact score of each edge (default: every edge of the graph).

    Args:
        edges: the edges to score (all-token, or token-specific with ``per_position``).
        metric, direction: as in `patchlab.eap` (default logit difference, noising).
        per_position: score every token-specific edge (when `edges` is None).
        block: edges per checkpoint.
        checkpoint: a netCDF file of the scores so far, written after every block; a
            rerun with the same file resumes after the finished blocks.

    Returns:
        Edge scores: ``score`` (edge) = ``m(patched) - m(base)`` (metric units), attrs
        ``method="exact"`` and provenance.

    Raises:
        ValueError: an edge outside the model's graph; a checkpoint of other edges or settings.
    """
    tokens = tokenize_for(model, dataset)
    runs = prepare_runs(model, tokens, graph_cache_sites(model), metric, direction)
    if edges is None:
        graph = Graph.from_model(model, n_pos=tokens.n_pos if per_position else None)
        edges = list(graph.edges())
    else:
        edges = sorted(set(edges))
        graph = Graph.from_model(model, n_pos=tokens.n_pos if any(e.pos is not None for e in edges) else None)
    attrs = score_attrs(model, dataset, runs, method="exact", seed=seed)
    base = float(runs.baselines["clean" if runs.direction is Direction.NOISING else "corrupted"].double().mean())
    scores = np.full(len(edges), np.nan)
    if checkpoint is not None and Path(checkpoint).exists():
        scores = _resume(checkpoint, edges, attrs)
    todo = [i for i in range(len(edges)) if np.isnan(scores[i])]
    bar = tqdm(total=len(edges), initial=len(edges) - len(todo), desc="exact edge scores", unit="edge",
               disable=not progress, leave=False)
    for start in range(0, len(todo), block):
        part = todo[start:start + block]
        values = edge_patch_rows(model, graph, base_ids=runs.base_ids, base=runs.base, source=runs.source,
                                 rows=[(edges[i],) for i in part], metric=runs.metric, targets=runs.targets,
                                 memory_mb=memory_mb, progress=False)
        scores[part] = values.double().mean(1).numpy() - base
        bar.update(len(part))
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                edge_scores(edges, scores, graph=graph, attrs=attrs).to_netcdf(tmp)
    bar.close()
    return edge_scores(edges, scores, graph=graph, attrs=attrs)


def _resume(path, edges: list[Edge], attrs: dict) -> np.ndarray:
    with xr.open_dataset(path) as saved:
        same = [saved.attrs.get(k) == attrs[k] for k in ("model_sha256", "dataset_sha256", "metric", "direction")]
        if not all(same) or list(saved["edge"].values.astype(str)) != [e.label for e in edges]:
            raise ValueError(f"checkpoint {path} holds scores of other edges or settings; delete it or pass "
                             "another checkpoint path")
        return saved["score"].values.astype(np.float64).copy()
