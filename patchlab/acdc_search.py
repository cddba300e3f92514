"""ACDC: automatic circuit discovery by greedy edge pruning with exact edge patching.

Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic
Interpretability" (arXiv 2304.14997). Start from the full graph on the clean
prompts. Walk the receivers in reverse topological order (logits first); for each
incoming edge (senders latest first), patch it to the corrupted run on top of the
edges already removed; if the metric moves by less than ``tau``, remove the edge for
good. As in Conmy et al.'s code, the test is one-sided: with the default metric, KL
divergence of the output from the clean output (nats), an edge is removed when the
KL grows by less than tau; with a metric where higher is better (logit difference,
log-probability, probability) when it falls by less than tau, so an edge whose
removal raises the metric always goes. ``abs_threshold=True`` uses
``|m(new) - m(current)| < tau`` instead. A receiver none of whose
outputs is still in the circuit loses its incoming edges without evaluation.

Each evaluation is one exact edge-patching pass (`patchlab.graph_runner`), so ACDC
costs one forward pass per evaluated edge (and, on a hosted model, one request per
evaluated edge: each decision depends on the previous one); ``candidates`` restricts the search to a
subset of edges (the others start removed), e.g. the top edges of an attribution
method on a model too big to prune edge by edge.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from ._io import atomic_write_text
from .circuit import Circuit, edge_scores, score_attrs
from .data import PromptPairDataset
from .edge_plan import EdgePlanner
from .graph import Edge, Graph, Node, NodeKind
from .graph_runner import edge_patch_rows, local_graph_cache
from .metrics import Metric, get_metric
from .models import PatchModel, takes_model
from .patching import tokenize_for

__all__ = ["acdc"]


@takes_model
def acdc(model: PatchModel, dataset: PromptPairDataset, *, tau: float = 0.01, metric: Metric | str = Metric.KL,
         candidates: Iterable[Edge] | None = None, per_position: bool = False, abs_threshold: bool = False,
         seed: int | None = None,
         checkpoint: str | os.PathLike | None = None, progress: bool = True, memory_mb: float = 1024,
         remote=None) -> Circuit:
    """Prune the graph to a circuit with ACDC (resample ablation, edge level).

    Args:
        tau: the threshold, in the metric's units (nats for KL and logit difference).
        metric: KL to the clean output (default) or any `Metric`.
        candidates: edges the search may keep (default: every edge); the rest start removed.
        per_position: search over token-specific edges (``Graph.from_model(model, n_pos=...)``).
        abs_threshold: remove an edge when the metric moves by less than tau either way.
        seed: recorded in attrs (ACDC is deterministic).
        checkpoint: a JSON file written after every receiver; a rerun with the same
            file and arguments resumes from it.
        remote: see `patchlab.remote`; this costs 1 request for the starting circuit (and
            the baselines) plus 1 per evaluated edge. Running here, the runs are cached once.

    Returns:
        A `Circuit` of the kept edges. Its scores (every edge) hold, for each
        evaluated edge, ``m(with it removed) - m(before)`` at the moment it was tried
        (metric units; 0 for edges never evaluated), ``evaluated`` (0/1), and attrs
        ``method="acdc"``, ``tau``, ``n_evaluated``, ``metric_final`` (the circuit's
        metric) and provenance.

    Raises:
        ValueError: candidates outside the graph; a checkpoint of a different search.
    """
    metric = get_metric(metric)
    tokens = tokenize_for(model, dataset, paired="acdc")
    graph = Graph.from_model(model, n_pos=tokens.n_pos if per_position else None)
    every = list(graph.edges())
    allowed = set(every) if candidates is None else set(candidates)
    if not allowed <= set(every):
        bad = sorted(allowed - set(every))[:3]
        raise ValueError(f"candidate edges {[e.label for e in bad]} are not edges of this model's graph"
                         + (" (per_position=True needs token-specific edges)" if per_position else ""))
    key = _search_key(model, dataset, metric, tau, (per_position, abs_threshold), allowed)
    acts = local_graph_cache(model, tokens, remote)
    planner = EdgePlanner(model, graph, tokens.n_pos)  # each step replans only the receiver whose edge changed

    def evaluate(removed: set[Edge]):
        return edge_patch_rows(model, graph, tokens=tokens, rows=[removed], metric=metric, acts=acts,
                               memory_mb=memory_mb, progress=False, remote=remote, planner=planner)

    state = _load(checkpoint, key) or {"key": key, "done": 0, "kept": sorted(e.label for e in allowed), "scores": {}}
    removed = set(every) - {Edge.from_label(lab) for lab in state["kept"]}
    start = evaluate(removed)  # the current circuit, and the clean and corrupted baselines
    state.setdefault("current", float(start.values.double().mean()))
    scores: dict[str, float] = state["scores"]
    receivers = list(reversed(graph.receivers))
    into, out_of = defaultdict(list), defaultdict(list)
    for e in every:
        into[(e.receiver, e.channel)].append(e)
        out_of[e.sender].append(e)
    kl = metric is Metric.KL
    bar = tqdm(total=len(allowed), desc="ACDC", unit="edge", disable=not progress, leave=False)
    bar.update(sum(1 for e in allowed if e in removed or e.label in scores))
    for i in range(state["done"], len(receivers)):
        receiver, channel = receivers[i]
        incoming = [e for e in into[(receiver, channel)] if e not in removed]
        changed = bool(incoming)
        if not _has_output(graph, receiver, removed, out_of):
            removed |= set(incoming)  # nothing downstream reads it
            bar.update(len(incoming))
            incoming = []
        for edge in sorted(incoming, reverse=True):
            new = float(evaluate(removed | {edge}).values.double().mean())
            change = new - state["current"]
            scores[edge.label] = change
            harm = abs(change) if abs_threshold else change if kl else -change  # KL: lower is better
            if harm < tau:
                removed.add(edge)
                state["current"] = new
            bar.update(1)
        if changed and checkpoint is not None:
            state.update(kept=sorted(e.label for e in allowed - removed), scores=scores)
        state["done"] = i + 1
        _save(checkpoint, state)
    bar.close()
    values = np.asarray([scores.get(e.label, 0.0) for e in every])
    evaluated = np.asarray([e.label in scores for e in every], dtype=np.int8)
    attrs = score_attrs(model, dataset, start, method="acdc", seed=seed, **tokens.pad_attrs(), tau=tau,
                        per_position=int(per_position),
                        abs_threshold=int(abs_threshold),
                        n_candidates=len(allowed), n_evaluated=int(evaluated.sum()), metric_final=state["current"],
                        ablation="resample", level="edge")
    ds = edge_scores(every, values, graph=graph, attrs=attrs, evaluated=evaluated)
    return Circuit(graph, frozenset(set(every) - removed), ds)


def _has_output(graph: Graph, receiver: Node, removed: set[Edge], out_of: dict) -> bool:
    """Whether some edge out of `receiver` (of its query heads, for a key/value head) is still kept."""
    if receiver.kind is NodeKind.LOGITS:
        return True
    if receiver.kind is NodeKind.KV_HEAD:
        group = graph.n_heads // graph.n_kv_heads
        senders = {Node(NodeKind.HEAD, receiver.layer, receiver.head * group + i) for i in range(group)}
    else:
        senders = {receiver}
    return any(e not in removed for s in senders for e in out_of[s])


def _search_key(model, dataset, metric, tau, per_position, allowed) -> str:
    text = json.dumps([model.weights_sha256, dataset.sha256(), metric.value, tau, per_position,
                       sorted(e.label for e in allowed)])
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path, key: str) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    state = json.loads(Path(path).read_text())
    if state.get("key") != key:
        raise ValueError(f"checkpoint {path} belongs to another ACDC search (model, dataset, metric, tau or "
                         "candidates differ); delete it or pass another checkpoint path")
    return state


def _save(path, state: dict) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(state) + "\n")
