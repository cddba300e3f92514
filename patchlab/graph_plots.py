"""Figures of graph-level results: per-channel path-patching heatmaps and a graph of the strongest paths.

Like `patchlab.plotting`, functions take result Datasets and return a matplotlib
Figure; they compute nothing beyond prompt means and never show or save.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from .plotting import default_title, plot_layer_head

__all__ = ["plot_channels", "plot_path_graph"]


def plot_channels(ds: xr.Dataset, var: str = "score", *, title: str | None = None) -> Figure:
    """One layer x head heatmap per receiver channel (q, k, v) of a path-patching result.

    Args:
        ds: a result with ``ds[var]`` over (channel, layer, head[, prompt]); the
            sender head is (layer, head).

    Returns:
        A figure with one panel per channel, sharing a symmetric colour scale.
    """
    channels = [str(c) for c in ds["channel"].values]
    fig, axes = plt.subplots(1, len(channels), figsize=(3.4 * len(channels) + 1.5, 0.28 * ds.sizes["layer"] + 2),
                             squeeze=False, layout="constrained")
    for ax, channel in zip(axes[0], channels):
        part = ds.sel(channel=channel).drop_vars("channel")
        plot_layer_head(part, var, ax=ax, title=f"sender -> {ds.attrs.get('receivers', '')} .{channel}")
    fig.suptitle(default_title(ds) if title is None else title)
    return fig


def plot_path_graph(to_logits: xr.Dataset, to_receivers: xr.Dataset | None = None, *, top: int = 8,
                    min_fraction: float = 0.05, var: str = "score", title: str | None = None) -> Figure:
    """The strongest paths as a graph: layers bottom to top, heads as nodes by index.

    Edges: the `top` strongest sender -> logits paths (from `to_logits`, dims
    (layer, head[, prompt])) and, if given, the `top` strongest sender -> receiver
    paths per channel (from `to_receivers`, dims (channel, layer, head[, prompt]),
    receivers in its ``receivers`` attr; a path into the receiver *set* is drawn
    to each of its heads). Paths weaker than `min_fraction` of the strongest one
    are left out, and of the q/k/v paths between one pair of heads only the
    strongest is drawn. Width follows |score|; blue is positive, red negative;
    q/k/v edges are drawn solid/dashed/dotted.
    """
    graph = nx.DiGraph()
    n_layers = to_logits.sizes["layer"]
    logits_score = _mean(to_logits[var])

    def add_head(label: str, layer: int, head: int) -> None:
        graph.add_node(label, pos=(head, layer))

    graph.add_node("logits", pos=((to_logits.sizes["head"] - 1) / 2, n_layers + 0.5))
    for (layer, head), score in _strongest(logits_score, top):
        add_head(f"L{layer}H{head}", layer, head)
        graph.add_edge(f"L{layer}H{head}", "logits", score=score, style="solid")
    if to_receivers is not None:
        receivers = str(to_receivers.attrs.get("receivers", "")).split(",")
        for label in receivers:
            layer, head = (int(x) for x in label[1:].split("H"))
            add_head(label, layer, head)
        styles = {"q": "solid", "k": "dashed", "v": "dotted"}
        for channel in to_receivers["channel"].values:
            scores = _mean(to_receivers[var].sel(channel=channel))
            for (layer, head), score in _strongest(scores, top):
                sender = f"L{layer}H{head}"
                add_head(sender, layer, head)
                for receiver in receivers:  # one edge per pair: keep the strongest channel
                    if not graph.has_edge(sender, receiver) or abs(graph.edges[sender, receiver]["score"]) < abs(score):
                        graph.add_edge(sender, receiver, score=score, style=styles.get(str(channel), "solid"))
    strongest = max((abs(d["score"]) for *_, d in graph.edges(data=True)), default=0.0)
    graph.remove_edges_from([(u, v) for u, v, d in graph.edges(data=True) if abs(d["score"]) < min_fraction * strongest])
    graph.remove_nodes_from([n for n in list(graph) if graph.degree(n) == 0])
    pos = nx.get_node_attributes(graph, "pos")
    fig, ax = plt.subplots(figsize=(8, 0.3 * n_layers + 2.5), layout="constrained")
    scores = np.array([abs(d["score"]) for *_, d in graph.edges(data=True)] or [1.0])
    scale = 4.0 / max(scores.max(), 1e-9)
    for style in ("solid", "dashed", "dotted"):
        edges = [(u, v) for u, v, d in graph.edges(data=True) if d["style"] == style]
        nx.draw_networkx_edges(graph, pos, edgelist=edges, ax=ax, style=style, arrows=True, arrowsize=8,
                               width=[0.5 + scale * abs(graph.edges[e]["score"]) for e in edges],
                               edge_color=["tab:blue" if graph.edges[e]["score"] > 0 else "tab:red" for e in edges])
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=260, node_color="white", edgecolors="black")
    nx.draw_networkx_labels(graph, pos, ax=ax, font_size=6)
    ax.set_ylim(-1, n_layers + 1.2)
    ax.set_ylabel("layer")
    ax.set_xlabel("head")
    ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.set_title(title or f"strongest paths ({var}; blue +, red -; q solid, k dashed, v dotted)")
    return fig


def _mean(da: xr.DataArray) -> xr.DataArray:
    return da.mean("prompt") if "prompt" in da.dims else da


def _strongest(scores: xr.DataArray, top: int) -> list[tuple[tuple[int, int], float]]:
    stacked = scores.stack(node=("layer", "head")).dropna("node")
    order = np.argsort(-np.abs(stacked.values))[:top]
    return [(tuple(int(x) for x in stacked["node"].values[i]), float(stacked.values[i])) for i in order]
