"""The computational graph: closed-form sizes, topological order, networkx, GQA and parallel residuals."""

from __future__ import annotations

import networkx as nx
import pytest

from patchlab.graph import Channel, Edge, Graph, Node, NodeKind

from .tiny_models import tiny_patch_model


def closed_form_edges(n: int, h: int, g: int, parallel: bool) -> int:
    """Sum over layers of (q, k, v receivers) x (senders before the layer) + MLP + logits."""
    total = 0
    for layer in range(n):
        before = 1 + layer * (h + 1)  # embed, and every head and MLP of earlier layers
        total += (h + 2 * g) * before + before + (0 if parallel else h)
    return total + 1 + n * (h + 1)


@pytest.mark.parametrize("n,h,g,parallel", [(3, 4, 4, False), (3, 4, 2, False), (2, 6, 6, True), (30, 9, 3, False)])
def test_edge_count_and_order(n, h, g, parallel):
    graph = Graph(n_layers=n, n_heads=h, n_kv_heads=g, parallel_residual=parallel)
    edges = list(graph.edges())
    assert len(edges) == graph.n_edges == closed_form_edges(n, h, g, parallel)
    assert edges == sorted(edges) and len(set(edges)) == len(edges)
    order = {node: i for i, node in enumerate(graph.nodes)}
    assert all(order[e.sender] < order[e.receiver] for e in edges)  # senders come first
    assert list(graph.nodes) == sorted(graph.nodes)


def test_token_specific_edges_multiply_by_positions():
    graph = Graph(n_layers=2, n_heads=2, n_kv_heads=2, n_pos=5)
    edges = list(graph.edges())
    assert len(edges) == 5 * closed_form_edges(2, 2, 2, False) == graph.n_edges
    assert {e.pos for e in edges} == set(range(5))


def test_gqa_keys_and_values_go_to_kv_heads():
    graph = Graph(n_layers=2, n_heads=4, n_kv_heads=2)
    into_k = {e.receiver for e in graph.edges() if e.channel is Channel.K}
    assert into_k == {Node(NodeKind.KV_HEAD, layer, g) for layer in range(2) for g in range(2)}
    assert {e.receiver.kind for e in graph.edges() if e.channel is Channel.Q} == {NodeKind.HEAD}
    mha = Graph(n_layers=2, n_heads=4, n_kv_heads=4)
    assert {e.receiver.kind for e in mha.edges() if e.channel is Channel.V} == {NodeKind.HEAD}


def test_parallel_residual_mlp_does_not_read_its_own_layer():
    seq, par = (Graph(n_layers=2, n_heads=2, n_kv_heads=2, parallel_residual=p) for p in (False, True))
    mlp1 = Node(NodeKind.MLP, 1)
    assert Node(NodeKind.HEAD, 1, 0) in seq.senders_into(mlp1)
    assert Node(NodeKind.HEAD, 1, 0) not in par.senders_into(mlp1) and Node(NodeKind.HEAD, 0, 1) in par.senders_into(mlp1)
    with pytest.raises(ValueError, match="not a receiver"):
        seq.senders_into(Node(NodeKind.EMBED))


def test_labels():
    head, kv, mlp = Node(NodeKind.HEAD, 9, 6), Node(NodeKind.KV_HEAD, 9, 2), Node(NodeKind.MLP, 3)
    assert (head.label, kv.label, mlp.label) == ("L9H6", "L9KV2", "L3.mlp")
    assert Edge(Node(NodeKind.HEAD, 2, 3), head, Channel.Q).label == "L2H3->L9H6.q"
    assert Edge(Node(NodeKind.EMBED), Node(NodeKind.LOGITS), Channel.IN, pos=4).label == "embed->logits@4"


def test_networkx_conversion_is_a_dag_with_every_edge():
    graph = Graph(n_layers=2, n_heads=3, n_kv_heads=3)
    g = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_edges() == graph.n_edges and g.number_of_nodes() == len(graph.nodes)
    assert g.has_edge("L0H1", "L1H2", key="k") and not g.has_edge("L1H2", "L0H1")
    assert set(g.predecessors("logits")) == {n.label for n in graph.senders}


@pytest.mark.parametrize("family,parallel,gqa", [("gpt_neox", True, False), ("qwen2", False, True)])
def test_from_model(family, parallel, gqa):
    graph = Graph.from_model(tiny_patch_model(family))
    assert graph.parallel_residual is parallel and graph.gqa is gqa and graph.n_layers == 3
