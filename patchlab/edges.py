"""Edge patching sweeps over the computational graph, as labelled ``xarray.Dataset`` results.

Edge patching replaces one sender's contribution to one receiver input and
recomputes everything downstream exactly (see `patchlab.graph_runner` for the
definition). It is not path patching: edge patching lets the patched receiver's
change flow on through every later node; `patchlab.paths` freezes the rest.

- **noising** (default here; METHODS.md's definition): the clean run, with the
  patched edges carrying the corrupted sender outputs;
- **denoising**: the corrupted run, with the patched edges carrying clean outputs.

Results carry ``patched`` (..., prompt) in the metric's units, the normalised
``score`` (formula in attrs), ``clean`` and ``corrupted`` baselines and the same
provenance attrs as node-level sweeps.
"""

from __future__ import annotations

from typing import Sequence

import xarray as xr

from .data import PromptPairDataset
from .graph import Channel, Edge, Graph, Node
from .graph_runner import edge_patch_rows
from .metrics import Direction, Metric
from .models import PatchModel, takes_model
from .patching import result_dataset, tokenize_for

__all__ = ["patch_edges", "patch_senders_into"]


@takes_model
def patch_edges(model: PatchModel, dataset: PromptPairDataset, edge_sets: Sequence[Sequence[Edge]], *,
                labels: Sequence[str] | None = None, metric: Metric | str = Metric.LOGIT_DIFF,
                direction: Direction | str = Direction.NOISING, seed: int | None = None,
                progress: bool = True, memory_mb: float = 1024, remote=None) -> xr.Dataset:
    """Patch each set of edges (one set per batch row), exactly.

    Args:
        edge_sets: sets of `Edge` values of ``Graph.from_model(model)``; an empty
            set is the unpatched base run.
        labels: one coordinate label per set (default: the edge labels joined by "+").
        metric, direction, seed: as in `patchlab.patch_layer_pos`.
        remote: see `patchlab.remote`; this costs 1 request.

    Returns:
        Dataset with ``patched`` (edge_set, prompt), ``score`` (edge_set),
        ``clean`` (prompt), ``corrupted`` (prompt).

    Raises:
        ValueError: an edge that is not in the model's graph, or labels of the wrong length.
    """
    edge_sets = [tuple(s) for s in edge_sets]
    labels = list(labels) if labels is not None else ["+".join(e.label for e in s) or "none" for s in edge_sets]
    if len(labels) != len(edge_sets):
        raise ValueError(f"{len(labels)} labels for {len(edge_sets)} edge sets")
    values, base, tokens = _run_edges(model, dataset, edge_sets, metric, direction, progress, memory_mb, remote)
    return result_dataset(model, dataset, tokens, base, values, ("edge_set",), {"edge_set": labels}, "edges", seed)


@takes_model
def patch_senders_into(model: PatchModel, dataset: PromptPairDataset, receiver: Node, channel: Channel | str,
                       *, metric: Metric | str = Metric.LOGIT_DIFF, direction: Direction | str = Direction.NOISING,
                       seed: int | None = None, progress: bool = True, memory_mb: float = 1024,
                       remote=None) -> xr.Dataset:
    """Patch every single edge into one receiver channel, e.g. every sender into L9H6's q.

    Args:
        metric, direction, seed: as in `patch_edges`.
        remote: see `patchlab.remote`; this costs 1 request.

    Returns:
        Dataset with ``patched`` (sender, prompt), ``score`` (sender); ``sender``
        coords are node labels ("embed", "L2H3", "L4.mlp"); attrs ``receiver`` and ``channel``.
    """
    channel = Channel(channel)
    graph = Graph.from_model(model)
    senders = graph.senders_into(receiver)
    edge_sets = [(Edge(s, receiver, channel),) for s in senders]
    values, base, tokens = _run_edges(model, dataset, edge_sets, metric, direction, progress, memory_mb, remote)
    return result_dataset(model, dataset, tokens, base, values, ("sender",), {"sender": [s.label for s in senders]},
                    "edges", seed, receiver=receiver.label, channel=channel.value)


def _run_edges(model, dataset, edge_sets, metric, direction, progress, memory_mb, remote):
    tokens = tokenize_for(model, dataset, paired="edge patching")
    result = edge_patch_rows(model, Graph.from_model(model), tokens=tokens, rows=edge_sets, metric=metric,
                             direction=direction, memory_mb=memory_mb, progress=progress, remote=remote)
    return result.values, result.baselines, tokens
