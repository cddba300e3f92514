"""Circuit evaluation: how much of the model's behaviour a circuit keeps.

A circuit ``C`` is run on the clean prompts with everything outside it ablated:

- **edge** level: every edge not in ``C`` is patched (edge patching, see
  `patchlab.graph_runner`); **node** level: every sender outside ``C``'s nodes is
  patched on all its outgoing edges (the embeddings are always kept);
- **resample** ablation: the patched values come from the corrupted run of the
  same prompt; **mean** ablation: from the mean over the dataset's corrupted
  prompts (per position; for Gemma's post-normed heads, the contribution of the
  mean head output, not the mean contribution);
- token-specific circuits (edges with a position) ablate per position.

Faithfulness (Wang et al. 2022; Hanna et al. 2024; METHODS.md):

    faithfulness(C) = (m(C) - m(empty)) / (m(full) - m(empty))

with ``m`` the mean metric over prompts, ``m(full)`` the clean run and ``m(empty)``
every edge ablated. The choices change the number a lot (Miller et al. 2024): they
are arguments and are recorded in the attrs. `faithfulness_curve` evaluates the
top-k edges of a score ranking for a range of k.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from ._choices import check_choice
from .circuit import Circuit, graph_of, rank_edges
from .data import PromptPairDataset
from .graph import Edge, Graph, NodeKind
from .graph_runner import ABLATIONS, edge_patch_rows
from .metrics import Metric, check_gap
from .models import PatchModel, takes_model
from .patching import tokenize_for
from .provenance import provenance_attrs

__all__ = ["ABLATIONS", "LEVELS", "evaluate_circuits", "faithfulness_curve", "curve_sizes"]

LEVELS = ("edge", "node")


@takes_model
def evaluate_circuits(model: PatchModel, dataset: PromptPairDataset, circuits: Sequence[Circuit], *,
                      labels: Sequence[str] | None = None, ablation: str = "resample", level: str = "edge",
                      metric: Metric | str = Metric.LOGIT_DIFF, seed: int | None = None,
                      progress: bool = True, memory_mb: float = 1024, remote=None) -> xr.Dataset:
    """Metric and faithfulness of each circuit with everything outside it ablated.

    Args:
        circuits: circuits of ``Graph.from_model(model)`` (all-token) or of the
            token-specific graph of the dataset's length.
        labels: one coordinate label per circuit (default: its size).
        ablation: "resample" (corrupted run of the same prompt) or "mean" (mean over
            the corrupted prompts, per position).
        level: "edge" (ablate the edges outside the circuit) or "node" (ablate the
            senders outside the circuit's nodes).
        metric: the metric (default logit difference, nats).
        remote: see `patchlab.remote`; this costs 1 request (every circuit in one program).

    Returns:
        Dataset with ``metric`` (circuit, prompt) in the metric's units,
        ``faithfulness`` (circuit) (1 = the full model, 0 = everything ablated),
        ``n_edges`` (circuit), ``full`` and ``empty`` (prompt); attrs ablation,
        level, metric, units, faithfulness_formula and provenance.

    Raises:
        ValueError: an unknown ablation or level, circuits of another graph, or
            wrong number of labels.
    """
    check_choice(ablation, "ablation", ABLATIONS)
    check_choice(level, "circuit level", LEVELS)
    circuits = list(circuits)
    labels = [str(len(c)) for c in circuits] if labels is None else [str(lab) for lab in labels]
    if len(labels) != len(circuits):
        raise ValueError(f"{len(labels)} labels for {len(circuits)} circuits")
    tokens = tokenize_for(model, dataset, paired="circuit evaluation")
    graph = _graph_for(model, circuits, tokens.n_pos)
    every = frozenset(graph.edges())
    rows = [every] + [_ablated(graph, every, c, level) for c in circuits]
    result = edge_patch_rows(model, graph, tokens=tokens, rows=rows, metric=metric, ablation=ablation,
                             memory_mb=memory_mb, progress=progress, remote=remote)
    values = result.values.double().numpy()
    full, empty, per_circuit = result.clean.double().numpy(), values[0], values[1:]
    check_gap(result.clean, result.values[0], result.metric, names=("full model", "empty circuit"))
    faith = (per_circuit.mean(1) - empty.mean()) / (full.mean() - empty.mean())
    m = result.metric
    ds = xr.Dataset({
        "metric": (("circuit", "prompt"), per_circuit, {"long_name": f"{m.value} with the rest ablated", "units": m.units}),
        "faithfulness": ("circuit", faith, {"long_name": "faithfulness", "units": "1"}),
        "n_edges": ("circuit", np.asarray([len(c) for c in circuits], dtype=np.int64)),
        "full": ("prompt", full, {"long_name": f"clean {m.value}", "units": m.units}),
        "empty": ("prompt", empty, {"long_name": f"{m.value} with every edge ablated", "units": m.units}),
    }, coords={"circuit": np.asarray(labels, dtype=str), "prompt": np.arange(tokens.n_prompts)})
    ds.attrs = provenance_attrs(
        model_id=model.model_id, model_sha256=model.weights_sha256, dataset_sha256=dataset.sha256(), seed=seed,
        metric=m.value, units=m.units, ablation=ablation, level=level,
        token_specific=int(graph.n_pos is not None), dataset=dataset.name, corruption=dataset.corruption,
        faithfulness_formula="(m(C) - m(empty)) / (m(full) - m(empty)), means over prompts", **tokens.pad_attrs())
    return ds


def curve_sizes(n_edges: int, n_points: int = 16) -> list[int]:
    """Circuit sizes for a curve: 0, then about log-spaced sizes up to `n_edges`."""
    sizes = np.unique(np.round(np.geomspace(1, n_edges, n_points)).astype(int)) if n_edges else []
    return [0] + [int(s) for s in sizes]


@takes_model
def faithfulness_curve(model: PatchModel, dataset: PromptPairDataset, scores: xr.Dataset, *,
                       sizes: Sequence[int] | None = None, **kwargs) -> xr.Dataset:
    """Faithfulness of the top-k edges of `scores` (by ``|score|``) for each size k.

    Args:
        scores: edge scores (`patchlab.circuit.edge_scores`) of any method.
        sizes: circuit sizes (default `curve_sizes`).
        **kwargs: ablation, level, metric, progress, memory_mb, remote as in `evaluate_circuits`
            (1 request for the whole curve).

    Returns:
        The `evaluate_circuits` Dataset with dim ``n_edges`` (the size k) instead of
        ``circuit``, and attrs ``method`` (of the scores) and ``ranking="|score|"``.
    """
    ranked = rank_edges(scores)
    sizes = curve_sizes(len(ranked)) if sizes is None else [int(k) for k in sizes]
    if any(not 0 <= k <= len(ranked) for k in sizes):
        raise ValueError(f"sizes must lie in 0..{len(ranked)} (the number of scored edges), got {sizes}")
    graph = graph_of(scores)
    circuits = [Circuit(graph, frozenset(ranked[:k]), scores) for k in sizes]
    ds = evaluate_circuits(model, dataset, circuits, **kwargs)
    ds = ds.swap_dims(circuit="n_edges").drop_vars("circuit")
    ds.attrs.update(method=str(scores.attrs.get("method", "")), ranking="|score|")
    return ds


def _graph_for(model: PatchModel, circuits: Sequence[Circuit], n_pos: int) -> Graph:
    graph = Graph.from_model(model)
    token_specific = Graph.from_model(model, n_pos=n_pos)
    for c in circuits:
        if c.graph not in (graph, token_specific):
            raise ValueError(f"a circuit of {c.graph} is not a circuit of this model and dataset "
                             f"({graph} or its token-specific version with n_pos={n_pos})")
    kinds = {c.graph for c in circuits}
    if len(kinds) > 1:
        raise ValueError("mix of all-token and token-specific circuits: evaluate them separately")
    return kinds.pop() if kinds else graph


def _ablated(graph: Graph, every: frozenset[Edge], circuit: Circuit, level: str) -> frozenset[Edge]:
    if level == "edge":
        return every - circuit.edges
    kept = {n for n in circuit.nodes} | {n for n in graph.senders if n.kind is NodeKind.EMBED}
    return frozenset(e for e in every if e.sender not in kept)

