"""Circuits: a subgraph of the model's computational graph with a score per edge.

Edge scores are an ``xarray.Dataset`` over the dim ``edge`` (coordinate values are
edge labels, "L2H3->L9H6.q"; coords ``sender``, ``receiver``, ``channel`` and
``pos``, -1 for an all-token edge) with the variable ``score``: the change of the
metric when that one edge is patched, ``m(patched) - m(base)``, in the metric's
units (estimated by attribution, or exact). The attrs say which method, metric and
direction made them, with the usual provenance.

A `Circuit` is a set of those edges (with the graph they belong to and the
scores), chosen by the top-k rule or by a discovery algorithm (ACDC). It is saved
to netCDF (the scores plus an ``in_circuit`` flag per edge), exported to JSON and
converted to networkx.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from ._io import atomic_path, atomic_write_text
from .graph import Edge, Graph, Node, NodeKind

__all__ = ["edge_scores", "score_attrs", "rank_edges", "Circuit"]

_GRAPH_ATTRS = ("n_layers", "n_heads", "n_kv_heads", "parallel_residual", "n_pos")


def edge_scores(edges: Sequence[Edge], score, *, graph: Graph, attrs: dict | None = None, **variables) -> xr.Dataset:
    """Labelled edge scores.

    Args:
        edges: the scored edges.
        score: ``[edge]`` values in the metric's units.
        graph: the graph the edges belong to (stored in attrs as ``graph_*``).
        attrs: attributes (method, metric, units, direction, provenance).
        **variables: more ``[edge]`` variables (e.g. ``in_circuit``).

    Returns:
        Dataset with ``score`` (edge) and the extra variables; coords ``edge``,
        ``sender``, ``receiver``, ``channel``, ``pos``.
    """
    edges = list(edges)
    data = {"score": ("edge", np.asarray(score, dtype=np.float64), {"long_name": "edge score"})}
    data.update({k: ("edge", np.asarray(v)) for k, v in variables.items()})
    ds = xr.Dataset(data, coords={
        "edge": np.asarray([e.label for e in edges], dtype=str),
        "sender": ("edge", np.asarray([e.sender.label for e in edges], dtype=str)),
        "receiver": ("edge", np.asarray([e.receiver.label for e in edges], dtype=str)),
        "channel": ("edge", np.asarray([e.channel.value for e in edges], dtype=str)),
        "pos": ("edge", np.asarray([-1 if e.pos is None else e.pos for e in edges], dtype=np.int64)),
    })
    ds.attrs = {**(attrs or {}), **{f"graph_{k}": _attr(getattr(graph, k)) for k in _GRAPH_ATTRS}}
    if "units" in ds.attrs:
        ds["score"].attrs["units"] = ds.attrs["units"]
    return ds


def score_attrs(model, dataset, runs, *, method: str, seed: int | None, **extra) -> dict:
    """Attrs of edge scores: method, metric and units, direction, the clean and corrupted
    metric means (metric units) and provenance (`patchlab.provenance.provenance_attrs`)."""
    from .provenance import provenance_attrs

    return provenance_attrs(
        model_id=model.model_id, model_sha256=model.weights_sha256, dataset_sha256=dataset.sha256(), seed=seed,
        git_path=Path(__file__).parent, method=method, metric=runs.metric.value, units=runs.metric.units,
        direction=runs.direction.value, score_meaning="m(patched) - m(base) when the one edge is patched",
        clean_mean=float(runs.baselines["clean"].double().mean()),
        corrupted_mean=float(runs.baselines["corrupted"].double().mean()), n_prompts=len(dataset),
        dataset=dataset.name, corruption=dataset.corruption, model_family=model.adapter.family, **extra)


def _attr(value):
    return -1 if value is None else int(value)


def graph_of(scores: xr.Dataset) -> Graph:
    """The graph recorded in an edge-score Dataset's attrs."""
    try:
        kw = {k: int(scores.attrs[f"graph_{k}"]) for k in _GRAPH_ATTRS}
    except KeyError as err:
        raise ValueError(f"these edge scores carry no graph attrs ({err}); make them with patchlab.circuit.edge_scores")
    kw["parallel_residual"] = bool(kw["parallel_residual"])
    kw["n_pos"] = None if kw["n_pos"] < 0 else kw["n_pos"]
    return Graph(**kw)


def rank_edges(scores: xr.Dataset) -> list[Edge]:
    """Edges by decreasing ``|score|`` (ties: topological order), the ranking every top-k rule uses."""
    edges = [Edge.from_label(str(label)) for label in scores["edge"].values]
    magnitude = np.abs(scores["score"].values)
    order = sorted(range(len(edges)), key=lambda i: (-magnitude[i], edges[i].sort_key))
    return [edges[i] for i in order]


@dataclass(frozen=True)
class Circuit:
    """A set of edges of `graph`, with the edge scores that chose them.

    Args:
        graph: the model's graph.
        edges: the circuit's edges.
        scores: edge scores (see `edge_scores`); they may cover more edges than the circuit.
    """

    graph: Graph
    edges: frozenset[Edge]
    scores: xr.Dataset

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", frozenset(self.edges))
        scored = set(self.scores["edge"].values.tolist())
        missing = [e.label for e in self.edges if e.label not in scored]
        if missing:
            raise ValueError(f"circuit edges without a score: {missing[:5]}")

    # ---- construction ------------------------------------------------------------
    @classmethod
    def top_k(cls, scores: xr.Dataset, k: int) -> "Circuit":
        """The `k` edges with the largest ``|score|``.

        Raises:
            ValueError: k outside ``0..n_edges``.
        """
        if not 0 <= k <= scores.sizes["edge"]:
            raise ValueError(f"k={k} outside 0..{scores.sizes['edge']} (the number of scored edges)")
        return cls(graph_of(scores), frozenset(rank_edges(scores)[:k]), scores)

    @classmethod
    def threshold(cls, scores: xr.Dataset, tau: float) -> "Circuit":
        """The edges with ``|score| >= tau`` (metric units)."""
        keep = np.abs(scores["score"].values) >= tau
        return cls(graph_of(scores), frozenset(Edge.from_label(str(lab)) for lab in scores["edge"].values[keep]), scores)

    # ---- views -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge: Edge) -> bool:
        return edge in self.edges

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Nodes touched by the circuit's edges, in topological order."""
        return tuple(sorted({e.sender for e in self.edges} | {e.receiver for e in self.edges}))

    def sorted_edges(self) -> list[Edge]:
        return sorted(self.edges)

    def score_of(self, edge: Edge) -> float:
        return float(self.scores["score"].sel(edge=edge.label))

    def connected(self) -> "Circuit":
        """The edges that lie on a path from the embeddings to the logits within the circuit
        (the rest cannot affect the output through the circuit)."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_edges_from((e.sender.label, e.receiver.label) for e in self.edges)
        group = self.graph.n_heads // self.graph.n_kv_heads  # a key/value head feeds its query heads
        g.add_edges_from((kv.label, Node(NodeKind.HEAD, kv.layer, kv.head * group + i).label)
                         for kv in self.nodes if kv.kind is NodeKind.KV_HEAD for i in range(group))
        embed, logits = Node(NodeKind.EMBED).label, Node(NodeKind.LOGITS).label
        if embed not in g or logits not in g:
            return Circuit(self.graph, frozenset(), self.scores)
        live = nx.descendants(g, embed) | {embed}
        live &= nx.ancestors(g, logits) | {logits}
        return Circuit(self.graph, frozenset(e for e in self.edges if e.sender.label in live
                                             and e.receiver.label in live), self.scores)

    # ---- export ------------------------------------------------------------------
    def to_dataset(self) -> xr.Dataset:
        """The scores with ``in_circuit`` (edge, 0/1) and ``circuit_size`` in attrs."""
        labels = {e.label for e in self.edges}
        flag = np.asarray([str(lab) in labels for lab in self.scores["edge"].values], dtype=np.int8)
        ds = self.scores.assign(in_circuit=("edge", flag, {"long_name": "edge is in the circuit"}))
        ds.attrs["circuit_size"] = len(self.edges)
        return ds

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> "Circuit":
        if "in_circuit" not in ds:
            raise ValueError("this Dataset has no in_circuit variable; it holds edge scores, not a circuit "
                             "(use Circuit.top_k(scores, k))")
        chosen = ds["edge"].values[ds["in_circuit"].values.astype(bool)]
        return cls(graph_of(ds), frozenset(Edge.from_label(str(lab)) for lab in chosen),
                   ds.drop_vars("in_circuit"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as netCDF (atomically)."""
        with atomic_path(path) as tmp:
            self.to_dataset().to_netcdf(tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        with xr.open_dataset(path) as ds:
            return cls.from_dataset(ds.load())

    def to_json(self, path: str | os.PathLike | None = None) -> dict:
        """The circuit as a JSON-able dict (graph, nodes, edges with scores, attrs); written if `path` is given."""
        obj = {
            "graph": {k: getattr(self.graph, k) for k in _GRAPH_ATTRS},
            "attrs": {k: _plain(v) for k, v in self.scores.attrs.items() if not k.startswith("graph_")},
            "nodes": [n.label for n in self.nodes],
            "edges": [{"edge": e.label, "sender": e.sender.label, "receiver": e.receiver.label,
                       "channel": e.channel.value, "pos": e.pos, "score": self.score_of(e)}
                      for e in self.sorted_edges()],
        }
        if path is not None:
            atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
        return obj

    def to_networkx(self):
        """A ``networkx.MultiDiGraph`` of the circuit: nodes by label (kind, layer, head),
        edges keyed by channel (and position) with ``score``."""
        import networkx as nx

        g = nx.MultiDiGraph()
        for node in self.nodes:
            g.add_node(node.label, kind=node.kind.value, layer=node.layer, head=node.head)
        for e in self.sorted_edges():
            key = e.channel.value if e.pos is None else f"{e.channel.value}@{e.pos}"
            g.add_edge(e.sender.label, e.receiver.label, key=key, channel=e.channel.value, pos=e.pos,
                       score=self.score_of(e), label=e.label)
        return g


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
