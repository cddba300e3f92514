"""Circuit diagrams place, colour and style what the circuit says, and save as PNG and SVG."""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import FancyArrowPatch

from patchlab.circuit import Circuit, edge_scores
from patchlab.circuit_plots import plot_circuit
from patchlab.graph import Edge, Graph


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def make_circuit(scored: dict[str, float], graph: Graph, *, extra: dict[str, float] | None = None) -> Circuit:
    """A circuit of the `scored` edges; `extra` edges are scored but left out of it."""
    everything = {**scored, **(extra or {})}
    edges = [Edge.from_label(label) for label in everything]
    ds = edge_scores(edges, list(everything.values()), graph=graph, attrs={"metric": "logit_diff", "units": "nats"})
    return Circuit(graph, frozenset(Edge.from_label(label) for label in scored), ds)


MHA = Graph(n_layers=4, n_heads=5, n_kv_heads=5)
SCORES = {  # MHA: q, k and v edges between the same two heads
    "embed->L0H2.q": 0.4, "embed->L0.mlp": 0.9, "L0H2->L2H2.q": 0.6, "L0H2->L2H2.k": -0.3,
    "L0H2->L2H2.v": 0.2, "L0.mlp->L3H2.q": -0.5, "L2H2->logits": 1.2, "L3H2->logits": -0.05,
    "L0H1->L3.mlp": 0.1, "L3.mlp->logits": 0.7, "embed->L0H1.q": 0.3,
}


def arrows(fig) -> dict[str, FancyArrowPatch]:
    """The drawn edges by label (their gid)."""
    return {p.get_gid(): p for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)}


def node_positions(fig) -> dict[str, tuple[float, float]]:
    """Node label -> data position (the labels sit on the nodes)."""
    return {t.get_text(): tuple(t.get_position()) for t in fig.axes[0].texts}


def test_nodes_are_placed_by_layer_and_head_index():
    circuit = make_circuit(SCORES, MHA)
    pos = node_positions(plot_circuit(circuit))
    assert set(pos) == {n.label for n in circuit.nodes}  # only the circuit's nodes are drawn
    y = {label: p[1] for label, p in pos.items()}
    assert y["embed"] < y["L0H2"] < y["L2H2"] < y["L3H2"] < y["logits"]
    assert y["embed"] == min(y.values()) and y["logits"] == max(y.values())
    assert y["L0H1"] == y["L0H2"] and y["L2H2"] < y["L3.mlp"] < y["logits"]
    assert pos["L0H2"][0] == pos["L2H2"][0] == pos["L3H2"][0] == 2.0  # same head, same x, any layer
    assert pos["L0H1"][0] == 1.0 and pos["L0.mlp"][0] == pos["L3.mlp"][0] > 4  # MLPs right of the heads


def test_x_positions_line_up_across_circuits_of_one_model():
    small = make_circuit({"embed->L3H2.q": 1.0}, MHA)
    big = make_circuit(SCORES, MHA)
    assert node_positions(plot_circuit(small))["L3H2"][0] == node_positions(plot_circuit(big))["L3H2"][0]
    assert plot_circuit(small).axes[0].get_xlim() == plot_circuit(big).axes[0].get_xlim()


def test_only_layers_with_nodes_get_a_row_labelled_with_their_number():
    ax = plot_circuit(make_circuit(SCORES, MHA)).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "3"]
    assert not ax.yaxis_inverted()


def test_one_arrow_per_edge_and_max_edges_keeps_the_strongest():
    circuit = make_circuit(SCORES, MHA)
    fig = plot_circuit(circuit)
    assert set(arrows(fig)) == set(SCORES) and len(arrows(fig)) == len(circuit)
    fig = plot_circuit(circuit, max_edges=3)
    assert set(arrows(fig)) == {"L2H2->logits", "embed->L0.mlp", "L3.mlp->logits"}
    assert "top 3 of 11 edges" in fig.axes[0].get_title()
    assert "top" not in plot_circuit(circuit, max_edges=11).axes[0].get_title()
    assert plot_circuit(circuit, max_edges=3, title="mine").axes[0].get_title().startswith("mine\n")
    assert plot_circuit(circuit, title="mine").axes[0].get_title() == "mine"
    with pytest.raises(ValueError, match="max_edges"):
        plot_circuit(circuit, max_edges=0)
    with pytest.raises(ValueError, match="finite"):
        plot_circuit(make_circuit({**SCORES, "embed->logits": float("nan")}, MHA))


def test_edges_not_in_the_circuit_are_not_drawn():
    circuit = make_circuit(SCORES, MHA, extra={"embed->logits": 5.0, "L1H0->L2H2.q": -3.0})
    fig = plot_circuit(circuit)
    assert set(arrows(fig)) == set(SCORES)
    assert "L1H0" not in node_positions(fig)


def test_blue_is_positive_and_red_negative():
    drawn = arrows(plot_circuit(make_circuit(SCORES, MHA)))
    red, _, blue, _ = drawn["L0H2->L2H2.q"].get_edgecolor()  # +0.6
    assert blue > red
    red, _, blue, _ = drawn["L0H2->L2H2.k"].get_edgecolor()  # -0.3
    assert red > blue
    signs = {np.sign(SCORES[label]): to_rgba(p.get_edgecolor(), 1.0) for label, p in drawn.items()}
    assert len(signs) == 2  # one colour per sign (alpha aside)


def test_channels_have_distinct_line_styles_and_do_not_overlap():
    drawn = arrows(plot_circuit(make_circuit(SCORES, MHA)))
    q, k, v = (drawn[f"L0H2->L2H2.{c}"] for c in "qkv")
    assert len({q.get_linestyle(), k.get_linestyle(), v.get_linestyle()}) == 3
    assert drawn["L2H2->logits"].get_linestyle() == "solid"
    bends = {str(p.get_connectionstyle().rad) for p in (q, k, v)}
    assert len(bends) == 3  # same two nodes, three different arcs


def test_widths_follow_absolute_score():
    drawn = arrows(plot_circuit(make_circuit(SCORES, MHA)))
    size = np.array([abs(SCORES[label]) for label in drawn])
    width = np.array([p.get_linewidth() for p in drawn.values()])
    slope, offset = np.polyfit(size, width, 1)
    assert slope > 0 and np.allclose(width, slope * size + offset)  # affine in |score|, wider when stronger
    assert width[size.argmax()] > 3 * width[size.argmin()]


def test_png_and_svg_are_written(tmp_path):
    fig = plot_circuit(make_circuit(SCORES, MHA))
    fig.savefig(tmp_path / "c.png")
    fig.savefig(tmp_path / "c.svg")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "c.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert 'id="L0H2-&gt;L2H2.k"' in svg  # edges keep their labels as ids


def test_grouped_query_graph_places_kv_heads_with_their_query_heads():
    graph = Graph(n_layers=3, n_heads=6, n_kv_heads=2)  # kv head g serves query heads 3g .. 3g+2
    scores = {"embed->L1KV0.k": 0.5, "embed->L1KV1.v": -0.4, "embed->L1H4.q": 0.3, "L1H4->logits": 0.8,
              "L0.mlp->L1KV1.k": 0.2, "embed->L0.mlp": 0.1, "L1H0->L2KV1.v": 0.05}
    fig = plot_circuit(make_circuit(scores, graph))
    pos = node_positions(fig)
    assert 0 <= pos["L1KV0"][0] <= 2 and 3 <= pos["L1KV1"][0] <= 5
    assert pos["L1KV1"][0] % 1 == 0.5  # between two query heads, never on top of one
    assert pos["L0.mlp"][1] < pos["L1KV1"][1] < pos["L1H4"][1] < pos["L2KV1"][1]
    drawn = arrows(fig)
    assert set(drawn) == set(scores)
    assert drawn["embed->L1KV1.v"].get_linestyle() != drawn["embed->L1KV0.k"].get_linestyle()


def test_token_specific_edges_get_one_arc_each():
    graph = Graph(n_layers=2, n_heads=2, n_kv_heads=2, n_pos=3)
    scores = {"embed->L1H0.q@0": 0.3, "embed->L1H0.q@1": -0.2, "embed->L1H0.q@2": 0.9, "L1H0->logits@2": 1.0}
    drawn = arrows(plot_circuit(make_circuit(scores, graph)))
    assert set(drawn) == set(scores)
    bends = {drawn[f"embed->L1H0.q@{p}"].get_connectionstyle().rad for p in range(3)}
    assert len(bends) == 3


def test_empty_circuit_says_so():
    fig = plot_circuit(make_circuit({}, MHA, extra={"embed->logits": 1.0}))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["empty circuit"] and not arrows(fig)
    assert "0 edges" in ax.get_title()


def test_draws_into_a_given_axes_and_changes_no_global_style():
    before = dict(mpl.rcParams)
    fig, (left, right) = plt.subplots(1, 2)
    assert plot_circuit(make_circuit(SCORES, MHA), ax=right) is fig
    assert not left.patches and len(arrows_in(right)) == len(SCORES)
    assert dict(mpl.rcParams) == before


def arrows_in(ax) -> list[FancyArrowPatch]:
    return [p for p in ax.patches if isinstance(p, FancyArrowPatch)]


def test_faithfulness_curves_draw_one_line_per_method():
    import xarray as xr

    from patchlab.circuit_plots import plot_faithfulness_curves

    curve = lambda values: xr.Dataset({"faithfulness": ("n_edges", np.asarray(values))},
                                      coords={"n_edges": [0, 10, 100]}, attrs={"ablation": "resample", "level": "edge"})
    fig = plot_faithfulness_curves({"eap": curve([0.0, 0.5, 1.0]), "acdc": curve([0.0, 0.8, 1.0])})
    lines = [line for line in fig.axes[0].get_lines() if line.get_label() in ("eap", "acdc")]
    assert [line.get_label() for line in lines] == ["eap", "acdc"]
    np.testing.assert_allclose(lines[1].get_ydata(), [0.0, 0.8, 1.0])
    other = curve([0.0, 0.1, 1.0]).assign_attrs(ablation="mean")
    with pytest.raises(ValueError, match="different ablation"):
        plot_faithfulness_curves({"a": curve([0, 1, 1]), "b": other})
    plt.close("all")
