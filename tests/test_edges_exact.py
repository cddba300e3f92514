"""Edge patching equals the independent plain-hook reference (`tests.reference_graph`) on every family."""

from __future__ import annotations

import random

import numpy as np

import pytest
import torch

import patchlab as pl
from patchlab.edges import patch_edges, patch_senders_into
from patchlab.graph import Channel, Edge, Graph, Node, NodeKind
from patchlab.metrics import Metric, Targets

from .reference_graph import RefEdge, reference_edge_patched_logits
from .precision import exact_atol
from .test_patching_exact import ALL_FAMILIES, random_pairs
from .tiny_models import tiny_model, tiny_patch_model, tiny_tokenizer


def ref_node(node: Node) -> tuple:
    if node.kind in (NodeKind.EMBED, NodeKind.LOGITS):
        return (node.kind.value,)
    if node.kind is NodeKind.MLP:
        return ("mlp", node.layer)
    return ("head", node.layer, node.head)


def ref_edge(edge: Edge) -> RefEdge:
    return RefEdge(ref_node(edge.sender), ref_node(edge.receiver), edge.channel.value, edge.pos)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request):
    model = tiny_patch_model(request.param)
    hf = model.hf
    dataset = random_pairs(hf.config.vocab_size)
    return model, dataset, dataset.tokenize(model.tokenizer), Graph.from_model(model)


def reference_values(model, tokens, edge_sets, direction: str) -> torch.Tensor:
    base, source = ((tokens.clean_ids, tokens.corrupted_ids) if direction == "noising"
                    else (tokens.corrupted_ids, tokens.clean_ids))
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    return torch.stack([Metric.LOGIT_DIFF(reference_edge_patched_logits(model.hf, base, source,
                                                                        [ref_edge(e) for e in s]), targets)
                        for s in edge_sets]).double()


def some_edge_sets(graph: Graph, n_pos: int, seed: int = 0) -> list[tuple[Edge, ...]]:
    """Single edges of every receiver kind and channel, token-specific ones, and mixed sets."""
    rng = random.Random(seed)
    edges = list(graph.edges())
    by_kind = {}
    for e in edges:
        by_kind.setdefault((e.sender.kind, e.receiver.kind, e.channel), []).append(e)
    singles = [(rng.choice(group),) for group in by_kind.values()]
    token_specific = [(Edge(e.sender, e.receiver, e.channel, pos=rng.randrange(n_pos)),) for (e,) in singles[:6]]
    receiver, channel = Node(NodeKind.MLP, 1), Channel.IN
    all_into_mlp = tuple(Edge(s, receiver, channel) for s in graph.senders_into(receiver))
    mixed = [tuple(rng.sample(edges, 12)) for _ in range(3)]
    return [()] + singles + token_specific + [all_into_mlp] + mixed


def large_edge_sets(graph: Graph, n_pos: int, seed: int = 1) -> list[tuple[Edge, ...]]:
    """Sets with most edges patched (the complement form): all edges but a few, all
    edges into one head channel but one, and token-specific complements."""
    rng = random.Random(seed)
    edges = list(graph.edges())
    minus = lambda pool, k: tuple(sorted(set(pool) - set(rng.sample(pool, k))))
    head = next(r for r, c in graph.receivers if r.kind is NodeKind.HEAD and r.layer == graph.n_layers - 1)
    into_q = [Edge(s, head, Channel.Q) for s in graph.senders_into(head)]
    per_pos = [e.with_pos(p) for e in edges for p in range(n_pos)]
    mixed = tuple(sorted(set(minus(per_pos, 20)) - {e for e in per_pos if e.receiver.kind is NodeKind.LOGITS}))
    return [minus(edges, 1), minus(edges, 5), minus(edges, 30), minus(into_q, 1), minus(per_pos, 7), mixed]


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("make_sets", [some_edge_sets, large_edge_sets], ids=["small", "large"])
def test_edge_sets_equal_reference(setup, direction, make_sets):
    model, dataset, tokens, graph = setup
    edge_sets = make_sets(graph, tokens.n_pos)
    ds = patch_edges(model, dataset, edge_sets, direction=direction, progress=False)
    expected = reference_values(model, tokens, edge_sets, direction)
    got = torch.from_numpy(ds.patched.values)
    tol = exact_atol(model, expected, edges=True)
    assert torch.allclose(got, expected, atol=tol, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_head_terms_in_batch_slabs_equal_reference(family, monkeypatch):
    """Sender-head differences projected one batch row at a time (the slabs that bound their memory)
    give the reference values; gemma2 covers the post-normed heads."""
    from patchlab.kernels import edges as kedges

    monkeypatch.setattr(kedges, "HEAD_TERM_ELEMENTS", 1)
    model = tiny_patch_model(family)
    dataset = random_pairs(model.hf.config.vocab_size)
    tokens, graph = dataset.tokenize(model.tokenizer), Graph.from_model(model)
    edge_sets = large_edge_sets(graph, tokens.n_pos)[:3] + some_edge_sets(graph, tokens.n_pos)[-3:]
    ds = patch_edges(model, dataset, edge_sets, progress=False)
    expected = reference_values(model, tokens, edge_sets, "noising")
    got = torch.from_numpy(ds.patched.values)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected, edges=True), rtol=0), \
        (got - expected).abs().max()


def test_every_edge_patched_is_the_source_run(setup):
    model, dataset, tokens, graph = setup
    ds = patch_edges(model, dataset, [tuple(graph.edges())], progress=False)
    corrupted = torch.from_numpy(ds.corrupted.values)
    assert torch.allclose(torch.from_numpy(ds.patched.values[0]), corrupted,
                          atol=exact_atol(model, corrupted, edges=True))


def test_empty_set_is_the_base_run_and_all_logit_edges_the_source_run(setup):
    model, dataset, tokens, graph = setup
    logits = Node(NodeKind.LOGITS)
    ds = patch_edges(model, dataset, [(), [Edge(s, logits, Channel.IN) for s in graph.senders]], progress=False)
    clean, corrupted = torch.from_numpy(ds.clean.values), torch.from_numpy(ds.corrupted.values)
    tol = exact_atol(model, clean, corrupted, edges=True)
    assert torch.allclose(torch.from_numpy(ds.patched.values[0]), clean, atol=tol)
    assert torch.allclose(torch.from_numpy(ds.patched.values[1]), corrupted, atol=tol)


def test_senders_into_a_query_sweep(setup):
    model, dataset, tokens, graph = setup
    receiver = Node(NodeKind.HEAD, 2, 1)
    ds = patch_senders_into(model, dataset, receiver, "q", progress=False)
    assert list(ds.sender.values) == [s.label for s in graph.senders_into(receiver)]
    edge_sets = [(Edge(s, receiver, Channel.Q),) for s in graph.senders_into(receiver)]
    expected = reference_values(model, tokens, edge_sets, "noising")
    tol = exact_atol(model, expected, edges=True)
    assert torch.allclose(torch.from_numpy(ds.patched.values), expected, atol=tol, rtol=0)


def test_edges_outside_the_graph_are_refused(setup):
    model, dataset, _, _ = setup
    backwards = Edge(Node(NodeKind.HEAD, 2, 0), Node(NodeKind.HEAD, 1, 0), Channel.Q)
    with pytest.raises(ValueError, match="not an edge"):
        patch_edges(model, dataset, [(backwards,)], progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_without_the_final_norm_edges_into_the_logits_add_up(family):
    """With the receiver's normalisation removed, the logits are linear in the final residual,
    so the effects of two edges into the logits add up exactly."""
    hf = tiny_model(family)
    norm_path = "transformer.ln_f" if family == "gpt2" else "model.norm"
    parent, name = norm_path.rsplit(".", 1)
    setattr(hf.get_submodule(parent), name, torch.nn.Identity())
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=torch.float64)
    dataset = random_pairs(hf.config.vocab_size)
    logits = Node(NodeKind.LOGITS)
    a, b = Edge(Node(NodeKind.HEAD, 1, 2), logits, Channel.IN), Edge(Node(NodeKind.MLP, 0), logits, Channel.IN)
    ds = patch_edges(model, dataset, [(), (a,), (b,), (a, b)], progress=False)
    none, only_a, only_b, both = torch.from_numpy(ds.patched.values)
    assert torch.allclose(both - none, (only_a - none) + (only_b - none), atol=exact_atol(model, none, edges=True))
    assert (only_a - none).abs().max() > 1e-3 and (only_b - none).abs().max() > 1e-3  # both edges matter


def test_path_results_round_trip_through_netcdf(tmp_path):
    import xarray as xr

    from patchlab.paths import path_patch_heads

    model = tiny_patch_model("qwen2")
    hf = model.hf
    ds = path_patch_heads(model, random_pairs(hf.config.vocab_size), receivers=[Node(NodeKind.HEAD, 2, 0)],
                          progress=False)
    ds.to_netcdf(tmp_path / "p.nc", engine="netcdf4")
    with xr.open_dataset(tmp_path / "p.nc", engine="netcdf4") as back:
        xr.testing.assert_identical(back.load(), ds)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3"])
def test_every_edge_into_a_channel_equals_patching_that_input(family):
    model = tiny_patch_model(family)
    hf = model.hf
    dataset = random_pairs(hf.config.vocab_size)
    graph = Graph.from_model(model)
    kv = NodeKind.KV_HEAD if graph.gqa else NodeKind.HEAD
    for node, channel, site in [(Node(NodeKind.HEAD, 2, 1), Channel.Q, "q"), (Node(kv, 1, 1), Channel.K, "k")]:
        edges = [Edge(s, node, channel) for s in graph.senders_into(node)]
        by_edges = patch_edges(model, dataset, [edges], progress=False)
        by_node = pl.patch_components(model, dataset, [pl.Component(site=site, layer=node.layer, head=node.head)],
                                      direction="noising", progress=False)
        assert np.allclose(by_edges.patched.values, by_node.patched.values,
                           atol=exact_atol(model, torch.from_numpy(by_node.patched.values), edges=True), rtol=0), site
