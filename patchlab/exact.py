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
from .graph_runner import edge_patch_rows, local_graph_cache
from .metrics import Direction, Metric, get_metric
from .models import PatchModel, takes_model
from .patching import tokenize_for

__all__ = ["exact_edge_scores"]


@takes_model
def exact_edge_scores(model: PatchModel, dataset: PromptPairDataset, *, edges: Iterable[Edge] | None = None,
                      metric: Metric | str = Metric.LOGIT_DIFF, direction: Direction | str = Direction.NOISING,
                      per_position: bool = False, seed: int | None = None, block: int = 512,
                      checkpoint: str | os.PathLike | None = None, progress: bool = True,
                      memory_mb: float = 1024, remote=None) -> xr.Dataset:
    """Exact score of each edge (default: every edge of the graph).

    Args:
        edges: the edges to score (all-token, or token-specific with ``per_position``).
        metric, direction: as in `patchlab.eap` (default logit difference, noising).
        per_position: score every token-specific edge (when `edges` is None).
        block: edges per checkpoint (and per remote request).
        checkpoint: a netCDF file of the scores so far, written after every block; a
            rerun with the same file resumes after the finished blocks.
        remote: see `patchlab.remote`; this costs 1 request per block of edges still to
            score (1 when the checkpoint already holds every score). Running here, the
            runs are cached once for all blocks.

    Returns:
        Edge scores: ``score`` (edge) = ``m(patched) - m(base)`` (metric units), attrs
        ``method="exact"`` and provenance.

    Raises:
        ValueError: an edge outside the model's graph; a checkpoint of other edges or settings.
    """
    metric, direction = get_metric(metric), Direction(direction)
    tokens = tokenize_for(model, dataset, paired="exact_edge_scores")
    if edges is None:
        graph = Graph.from_model(model, n_pos=tokens.n_pos if per_position else None)
        edges = list(graph.edges())
    else:
        edges = sorted(set(edges))
        graph = Graph.from_model(model, n_pos=tokens.n_pos if any(e.pos is not None for e in edges) else None)
    scores = np.full(len(edges), np.nan)
    if checkpoint is not None and Path(checkpoint).exists():
        settings = {"model_sha256": model.weights_sha256, "dataset_sha256": dataset.sha256(),
                    "metric": metric.value, "direction": direction.value}
        scores = _resume(checkpoint, edges, settings)
    todo = [i for i in range(len(edges)) if np.isnan(scores[i])]
    acts = local_graph_cache(model, tokens, remote)

    def run(part: list[int]):
        return edge_patch_rows(model, graph, tokens=tokens, rows=[(edges[i],) for i in part], metric=metric,
                               direction=direction, acts=acts, memory_mb=memory_mb, progress=False, remote=remote)

    bar = tqdm(total=len(edges), initial=len(edges) - len(todo), desc="exact edge scores", unit="edge",
               disable=not progress, leave=False)
    attrs = base = None
    for start in range(0, max(len(todo), 1), block):  # no edge left: one pass for the baselines
        part = todo[start:start + block]
        result = run(part)
        if attrs is None:
            attrs = score_attrs(model, dataset, result, method="exact", seed=seed, **tokens.pad_attrs())
            base = float(result.baselines["clean" if direction is Direction.NOISING else "corrupted"].double().mean())
        scores[part] = result.values.double().mean(1).numpy() - base
        bar.update(len(part))
        if checkpoint is not None and part:
            with atomic_path(checkpoint) as tmp:
                edge_scores(edges, scores, graph=graph, attrs=attrs).to_netcdf(tmp)
    bar.close()
    return edge_scores(edges, scores, graph=graph, attrs=attrs)


def _resume(path, edges: list[Edge], settings: dict) -> np.ndarray:
    with xr.open_dataset(path) as saved:
        same = [saved.attrs.get(k) == v for k, v in settings.items()]
        if not all(same) or list(saved["edge"].values.astype(str)) != [e.label for e in edges]:
            raise ValueError(f"checkpoint {path} holds scores of other edges or settings; delete it or pass "
                             "another checkpoint path")
        return saved["score"].values.astype(np.float64).copy()
