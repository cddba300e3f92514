"""Circuit diagrams: a `patchlab.circuit.Circuit` drawn as a layered graph.

Layers run bottom to top: the embeddings below the lowest drawn layer, the logits
above the highest. Only layers with a drawn node get a row (the y axis is labelled
with their layer numbers), so a circuit in a deep model stays compact. Within a
row, x is the head index, so diagrams of one model line up whatever their nodes:

- query head h at ``x = h``;
- key/value head g of a grouped-query model (label "L9KV2") a little below the
  row, between the middle two of the query heads it serves (heads ``g * group ..
  (g + 1) * group - 1``, ``group = n_heads // n_kv_heads``), so never on top of
  one: ``x = g * group + ceil(group / 2) - 1/2``; thin grey lines tie it to those
  of its query heads that are drawn;
- the MLP right of the last head, a little above the row (it reads the heads' output).

Edges are blue for a positive score and red for a negative one (as in
`patchlab.plotting`), their width and opacity grow with ``|score|`` over the largest
drawn ``|score|``, and their line style names the receiver's channel: q solid, k
dashed, v dotted, in (MLP, logits) solid. Edges between the same two nodes bend by
a different amount per channel, and token-specific edges once more per position,
so that none hides another; long edges bend less, to stay near their nodes. Each
edge is a `matplotlib.patches.FancyArrowPatch` whose gid is the edge label
("L2H3->L9H6.q"), which SVG output keeps as its id.

Like `patchlab.plotting`, the figure is returned; nothing is shown, saved or
changed globally. Layout and drawing need networkx and matplotlib only (no graphviz).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

import xarray as xr

from .circuit import Circuit
from .graph import Channel, Graph, NodeKind
from .plotting import _STYLE, _new_figure, default_title

__all__ = ["plot_circuit", "plot_faithfulness_curves"]

_POSITIVE, _NEGATIVE = "#2166ac", "#b2182b"  # the blue and red ends of RdBu, as in the heatmaps
_CHANNEL_STYLE = {  # line style, bend (arc3 rad) of an edge into this channel
    Channel.Q: ("solid", 0.08), Channel.K: ("dashed", 0.32), Channel.V: ("dotted", -0.2), Channel.IN: ("solid", 0.08),
}
_CHANNEL_NAME = {Channel.Q: "into q", Channel.K: "into k", Channel.V: "into v", Channel.IN: "into MLP / logits"}
_POS_BEND = 0.07  # extra bend per position among token-specific edges between the same nodes and channel
_BEND_LENGTH = 2.5  # edges longer than this (in head/row units) bend less: rad * length stays fixed
_NODE_STYLE = {  # face colour, marker, legend name
    NodeKind.EMBED: ("#d9d9d9", "s", "embed"), NodeKind.HEAD: ("#fde9b5", "o", "head"),
    NodeKind.KV_HEAD: ("#f6c49a", "D", "kv head"), NodeKind.MLP: ("#cde8c4", "s", "MLP"),
    NodeKind.LOGITS: ("#dccbe8", "s", "logits"),
}
_NODE_SIZE, _KV_SIZE = 760, 560  # points^2 (a diamond of the same size looks bigger)
_KV_DROP, _MLP_LIFT = 0.32, 0.25  # offsets from the layer's row, in rows


def plot_circuit(circuit: Circuit, *, title: str | None = None, max_edges: int | None = None,
                 ax: Axes | None = None) -> Figure:
    """A circuit diagram: nodes placed by layer (bottom to top) and head index, edges
    coloured by the sign of their score, weighted by ``|score|``, styled by channel.

    The layout and colours are described in the module docstring. Only nodes that a
    drawn edge touches are drawn; node colour and marker give the kind (embed, head,
    kv head, MLP, logits) and the label names the node ("L1H3", "L9KV2", "L3.mlp").

    Args:
        circuit: the circuit; its ``scores`` give each edge's score (metric units).
        title: the axes title (default: the circuit size and the scores' attrs, see
            `patchlab.plotting.default_title`). When `max_edges` leaves edges out, a
            note saying so is added to either title.
        max_edges: draw only this many edges, those with the largest ``|score|`` (ties:
            topological order, as `patchlab.circuit.rank_edges`); None draws all.
        ax: draw into this axes (its figure is returned); default a new figure sized
            to the model's heads and the circuit's layers.

    Returns:
        The figure. An empty circuit gives an axes that says "empty circuit".

    Raises:
        ValueError: `max_edges` below 1, or a drawn edge whose score is NaN or infinite.
    """
    if max_edges is not None and max_edges < 1:
        raise ValueError(f"max_edges={max_edges}; draw at least one edge (or pass None for all)")
    score = dict(zip(circuit.scores["edge"].values.tolist(), circuit.scores["score"].values.tolist()))
    ranked = sorted(circuit.edges, key=lambda e: (-abs(score[e.label]), e.sort_key))
    drawn = ranked if max_edges is None else ranked[:max_edges]
    bad = [e.label for e in drawn if not np.isfinite(score[e.label])]
    if bad:
        raise ValueError(f"edges without a finite score cannot be drawn: {bad[:5]}")
    g = Circuit(circuit.graph, frozenset(drawn), circuit.scores).to_networkx()
    pos, layers = _layout(g, circuit.graph)
    if ax is None:
        width = min(max(6.0, 0.62 * (circuit.graph.n_heads + 2) + 3.0), 26.0)
        _, (ax,) = _new_figure(width, min(max(3.5, 0.85 * (len(layers) + 2) + 1.3), 22.0))
    with plt.rc_context(_STYLE):
        ax.set_title(_title(circuit, len(drawn), title))
        if not drawn:
            ax.text(0.5, 0.5, "empty circuit", transform=ax.transAxes, ha="center", va="center")
            ax.set_axis_off()
            return ax.figure
        biggest = max(abs(s) for *_, s in g.edges(data="score")) or 1.0
        _draw_edges(ax, g, pos, biggest)
        _draw_nodes(ax, g, pos, circuit.graph)
        _decorate(ax, g, pos, layers, circuit, biggest)
    return ax.figure


def _layout(g: nx.MultiDiGraph, graph: Graph) -> tuple[dict[str, tuple[float, float]], list[int]]:
    """Node positions (x by head index, y by row) and the layers that got a row, bottom up."""
    layers = sorted({layer for _, layer in g.nodes(data="layer") if layer is not None})
    row = {layer: i for i, layer in enumerate(layers)}
    group = graph.n_heads // graph.n_kv_heads
    middle = (graph.n_heads - 1) / 2
    pos = {}
    for label, d in g.nodes(data=True):
        kind = NodeKind(d["kind"])
        if kind is NodeKind.EMBED:
            pos[label] = (middle, -1.0)
        elif kind is NodeKind.LOGITS:
            pos[label] = (middle, float(len(layers)))
        elif kind is NodeKind.HEAD:
            pos[label] = (float(d["head"]), float(row[d["layer"]]))
        elif kind is NodeKind.KV_HEAD:
            pos[label] = (d["head"] * group + (group + 1) // 2 - 0.5, row[d["layer"]] - _KV_DROP)
        else:
            pos[label] = (graph.n_heads + 0.5, row[d["layer"]] + _MLP_LIFT)
    return pos, layers


def _draw_edges(ax: Axes, g: nx.MultiDiGraph, pos: dict, biggest: float) -> None:
    """One `draw_networkx_edges` call per (line style, bend); the bend depends on the channel,
    the rank among token-specific edges of one node pair and channel, and the edge's length."""
    parallel = defaultdict(list)  # token-specific edges between the same nodes into the same channel
    for u, v, key, d in g.edges(keys=True, data=True):
        parallel[u, v, d["channel"]].append((-1 if d["pos"] is None else d["pos"], key))
    groups = defaultdict(list)
    for (u, v, channel), keyed in parallel.items():
        style, bend = _CHANNEL_STYLE[Channel(channel)]
        length = max(_BEND_LENGTH, float(np.hypot(*np.subtract(pos[v], pos[u]))))
        for rank, (_, key) in enumerate(sorted(keyed)):
            rad = (bend + np.copysign(_POS_BEND, bend) * rank) * _BEND_LENGTH / length
            groups[style, round(rad, 3)].append((u, v, key))
    for (style, rad), edgelist in sorted(groups.items()):
        data = [g.edges[e] for e in edgelist]
        share = [abs(d["score"]) / biggest for d in data]
        colours = [to_rgba(_POSITIVE if d["score"] >= 0 else _NEGATIVE, 0.4 + 0.6 * s) for d, s in zip(data, share)]
        patches = nx.draw_networkx_edges(
            g, pos, edgelist=edgelist, ax=ax, arrows=True, arrowstyle="-|>", arrowsize=9,
            width=[0.6 + 3.4 * s for s in share], edge_color=colours, style=style,
            connectionstyle=f"arc3,rad={rad}", node_size=_NODE_SIZE)
        for patch, d, s in zip(patches, data, share):
            patch.set_gid(d["label"])
            patch.set_zorder(1 + s)  # strong edges on top of weak ones, all below the nodes


def _draw_nodes(ax: Axes, g: nx.MultiDiGraph, pos: dict, graph: Graph) -> None:
    """Grey lines from each kv head to its drawn query heads, then the nodes by kind, then their labels."""
    group = graph.n_heads // graph.n_kv_heads
    for label, d in g.nodes(data=True):  # a kv head to the drawn query heads it serves
        if d["kind"] == NodeKind.KV_HEAD.value:
            for h in range(d["head"] * group, (d["head"] + 1) * group):
                head = f"L{d['layer']}H{h}"
                if head in pos:
                    ax.plot(*zip(pos[label], pos[head]), color="0.7", lw=0.8, zorder=0.5)
    for kind, (colour, marker, _) in _NODE_STYLE.items():
        nodes = [n for n, k in g.nodes(data="kind") if k == kind.value]
        if nodes:
            size = _KV_SIZE if kind is NodeKind.KV_HEAD else _NODE_SIZE
            nx.draw_networkx_nodes(g, pos, nodelist=nodes, ax=ax, node_size=size, node_shape=marker,
                                   node_color=colour, edgecolors="0.3", linewidths=0.8)
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=6)


def _decorate(ax: Axes, g: nx.MultiDiGraph, pos: dict, layers: list[int], circuit: Circuit,
              biggest: float) -> None:
    """Axes limits and ticks (shared by every diagram of the model), and the legend."""
    n_heads = circuit.graph.n_heads
    ys = [y for _, y in pos.values()]
    ax.set_xlim(-0.8, n_heads + 1.3)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.set_xticks([*range(n_heads), n_heads + 0.5], [*map(str, range(n_heads)), "MLP"])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.spines[["top", "right"]].set_visible(False)
    channels = {Channel(c) for *_, c in g.edges(data="channel")}
    kinds = {NodeKind(k) for _, k in g.nodes(data="kind")}
    handles = [Line2D([], [], color=_POSITIVE, lw=2.5, label="score ≥ 0"),
               Line2D([], [], color=_NEGATIVE, lw=2.5, label="score < 0")]
    handles += [Line2D([], [], color="0.3", lw=1.5, ls=_CHANNEL_STYLE[c][0], label=_CHANNEL_NAME[c])
                for c in Channel if c in channels]
    handles += [Line2D([], [], ls="", marker=m, ms=9, mfc=colour, mec="0.3", label=name)
                for kind, (colour, m, name) in _NODE_STYLE.items() if kind in kinds]
    if NodeKind.KV_HEAD in kinds:
        handles.append(Line2D([], [], color="0.7", lw=0.8, label="kv head: its query heads"))
    units = circuit.scores.attrs.get("units", "")
    heading = f"width ~ |score|, max {biggest:.3g}" + (f" {units}" if units else "")
    if any(p is not None for *_, p in g.edges(data="pos")):
        heading += "\ntoken-specific edges:\none arc per position"
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7,
              title=heading, title_fontsize=7, alignment="left")


def _title(circuit: Circuit, n_drawn: int, title: str | None) -> str:
    n = len(circuit)
    note = f"top {n_drawn} of {n} edges by |score|" if n_drawn < n else ""
    if title is not None:
        return title + (f"\n({note})" if note else "")
    head = f"circuit: {n} edge{'' if n == 1 else 's'}" + (f", {note}" if note else "")
    return "\n".join(p for p in (head, default_title(circuit.scores)) if p)


def plot_faithfulness_curves(curves: Mapping[str, xr.Dataset], *, title: str | None = None) -> Figure:
    """Circuit size (``n_edges``, log scale) against faithfulness, one line per method.

    Args:
        curves: method name -> `patchlab.faithfulness_curve` result.

    Raises:
        ValueError: no curves, or curves with different ablation or level settings.
    """
    if not curves:
        raise ValueError("no faithfulness curves to plot")
    settings = {(str(c.attrs.get("ablation")), str(c.attrs.get("level"))) for c in curves.values()}
    if len(settings) > 1:
        raise ValueError(f"curves with different ablation/level settings {sorted(settings)}: plot them separately")
    ablation, level = settings.pop()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(np.maximum(curve["n_edges"].values, 0.5), curve["faithfulness"].values, marker="o", ms=3, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("circuit size: top-k edges by |score| (0 drawn at 0.5)")
    ax.set_ylabel("faithfulness")
    ax.legend(frameon=False)
    ax.set_title(title or f"faithfulness ({level} level, {ablation} ablation)")
    return fig
