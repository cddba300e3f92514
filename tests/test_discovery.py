"""Exact edge scores, circuit evaluation and ACDC against the plain-hook reference;
circuits, agreement and ROC AUC against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import patchlab as pl
from patchlab.acdc_search import acdc
from patchlab.agreement import agreement, roc_auc
from patchlab.circuit import Circuit, edge_scores, rank_edges
from patchlab.exact import exact_edge_scores
from patchlab.faithfulness import evaluate_circuits, faithfulness_curve
from patchlab.graph import Channel, Edge, Graph, Node, NodeKind
from patchlab.metrics import Metric, Targets

from .reference_graph import _edge_run, reference_contributions, reference_edge_patched_logits
from .test_edges_exact import ref_edge
from .precision import EXACT, exact_atol
from .test_patching_exact import ALL_FAMILIES, random_pairs
from .tiny_models import tiny_patch_model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model = tiny_patch_model(request.param)
    hf = model.hf
    dataset = random_pairs(hf.config.vocab_size)
    return model, dataset, dataset.tokenize(model.tokenizer), Graph.from_model(model)


def ref_metric(model, tokens, edges, *, source=None, metric=Metric.LOGIT_DIFF) -> torch.Tensor:
    """Reference metric per prompt: the clean run with `edges` patched (from the corrupted run,
    or from the given source contributions)."""
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids,
                      clean_logprobs=torch.log_softmax(model.hf(tokens.clean_ids).logits[:, -1].detach(), -1))
    refs = [ref_edge(e) for e in edges]
    if source is None:
        logits = reference_edge_patched_logits(model.hf, tokens.clean_ids, tokens.corrupted_ids, refs)
    else:
        logits = _edge_run(model.hf, tokens.clean_ids, refs, source)[0]
    return metric(logits, targets).double()


def test_exact_scores_equal_single_edge_reference(setup):
    model, dataset, tokens, graph = setup
    edges = list(graph.edges())[::17]
    ds = exact_edge_scores(model, dataset, edges=edges, progress=False)
    clean = ref_metric(model, tokens, []).mean()
    for e in edges:
        expected = float(ref_metric(model, tokens, [e]).mean() - clean)
        tol = exact_atol(model, clean, edges=True)
        assert float(ds["score"].sel(edge=e.label)) == pytest.approx(expected, abs=tol)


def test_exact_scores_resume_from_a_checkpoint(setup, tmp_path, monkeypatch):
    model, dataset, _, graph = setup
    edges = list(graph.edges())[:40]
    full = exact_edge_scores(model, dataset, edges=edges, progress=False)
    path = tmp_path / "exact.nc"
    import patchlab.exact as exact_module

    real, calls = exact_module.edge_patch_rows, []

    def flaky(*args, **kwargs):
        calls.append(len(kwargs["rows"]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(exact_module, "edge_patch_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        exact_edge_scores(model, dataset, edges=edges, block=16, checkpoint=path, progress=False)
    monkeypatch.setattr(exact_module, "edge_patch_rows", real)
    resumed = exact_edge_scores(model, dataset, edges=edges, block=16, checkpoint=path, progress=False)
    np.testing.assert_allclose(resumed["score"].values, full["score"].values, atol=EXACT)
    assert calls == [16, 16]  # the first block was kept, not recomputed


def test_circuit_metric_equals_reference_with_the_rest_patched(setup):
    model, dataset, tokens, graph = setup
    every = list(graph.edges())
    rng = np.random.default_rng(0)
    circuit_edges = [every[i] for i in rng.choice(len(every), 15, replace=False)]
    scores = edge_scores(every, rng.normal(size=len(every)), graph=graph)
    circuit = Circuit(graph, circuit_edges, scores)
    ds = evaluate_circuits(model, dataset, [circuit], progress=False)
    rest = [e for e in every if e not in circuit]
    expected = ref_metric(model, tokens, rest)
    np.testing.assert_allclose(ds["metric"].values[0], expected.numpy(), atol=exact_atol(model, expected, edges=True))
    empty, full = ref_metric(model, tokens, every).mean(), ref_metric(model, tokens, []).mean()
    faithfulness = float((expected.mean() - empty) / (full - empty))
    assert float(ds["faithfulness"][0]) == pytest.approx(faithfulness, abs=exact_atol(model, expected, edges=True))
    assert ds.attrs["ablation"] == "resample" and ds.attrs["level"] == "edge"


def test_mean_ablation_patches_the_mean_corrupted_contributions(setup):
    model, dataset, tokens, graph = setup
    every = list(graph.edges())
    keep = every[-12:]
    circuit = Circuit(graph, keep, edge_scores(every, np.ones(len(every)), graph=graph))
    ds = evaluate_circuits(model, dataset, [circuit], ablation="mean", progress=False)
    corrupted = reference_contributions(model.hf, tokens.corrupted_ids)
    mean = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in corrupted.items()}
    expected = ref_metric(model, tokens, [e for e in every if e not in keep], source=mean)
    np.testing.assert_allclose(ds["metric"].values[0], expected.numpy(), atol=exact_atol(model, expected, edges=True))


def test_token_specific_circuit_ablates_per_position(setup):
    model, dataset, tokens, _ = setup
    graph = Graph.from_model(model, n_pos=tokens.n_pos)
    every = list(graph.edges())
    keep = [e for e in every if e.pos == tokens.n_pos - 1 and e.receiver.kind is NodeKind.LOGITS] + every[:40:7]
    circuit = Circuit(graph, keep, edge_scores(every, np.ones(len(every)), graph=graph))
    ds = evaluate_circuits(model, dataset, [circuit], progress=False)
    assert ds.attrs["token_specific"] == 1
    expected = ref_metric(model, tokens, [e for e in every if e not in set(keep)])
    np.testing.assert_allclose(ds["metric"].values[0], expected.numpy(), atol=exact_atol(model, expected, edges=True))


def test_node_level_ablates_every_edge_out_of_the_other_senders(setup):
    model, dataset, tokens, graph = setup
    every = list(graph.edges())
    nodes = {Node(NodeKind.HEAD, 1, 0), Node(NodeKind.MLP, 0)}
    keep = [e for e in every if e.sender in nodes and e.receiver.kind is NodeKind.LOGITS]
    circuit = Circuit(graph, keep, edge_scores(every, np.ones(len(every)), graph=graph))
    ds = evaluate_circuits(model, dataset, [circuit], level="node", progress=False)
    expected = ref_metric(model, tokens, [e for e in every if e.sender not in nodes and e.sender.kind is not NodeKind.EMBED])
    np.testing.assert_allclose(ds["metric"].values[0], expected.numpy(), atol=exact_atol(model, expected, edges=True))


def test_full_circuit_is_faithful_and_empty_is_not(setup):
    model, dataset, _, graph = setup
    every = list(graph.edges())
    scores = edge_scores(every, np.arange(len(every), dtype=float), graph=graph)
    curve = faithfulness_curve(model, dataset, scores, sizes=[0, 5, len(every)], progress=False)
    assert list(curve["n_edges"].values) == [0, 5, len(every)]
    assert curve["faithfulness"].values[0] == pytest.approx(0, abs=EXACT)
    assert curve["faithfulness"].values[-1] == pytest.approx(1, abs=EXACT)


def naive_acdc(model, tokens, graph, tau):
    """ACDC written out with the reference: reverse topological receivers, latest sender first, KL."""
    every = list(graph.edges())
    clean_lp = torch.log_softmax(model.hf(tokens.clean_ids).logits[:, -1].detach().double(), -1)

    def kl(removed):
        lp = torch.log_softmax(reference_edge_patched_logits(model.hf, tokens.clean_ids, tokens.corrupted_ids,
                                                             [ref_edge(e) for e in removed]).double(), -1)
        return float((clean_lp.exp() * (clean_lp - lp)).sum(-1).mean())

    removed, current = set(), kl(set())
    for receiver, channel in reversed(graph.receivers):
        users = ({Node(NodeKind.HEAD, receiver.layer, receiver.head * (graph.n_heads // graph.n_kv_heads) + i)
                  for i in range(graph.n_heads // graph.n_kv_heads)} if receiver.kind is NodeKind.KV_HEAD
                 else {receiver})
        alive = receiver.kind is NodeKind.LOGITS or any(e.sender in users and e not in removed for e in every)
        incoming = sorted((e for e in every if (e.receiver, e.channel) == (receiver, channel)), reverse=True)
        for e in incoming:
            if not alive:
                removed.add(e)
                continue
            new = kl(removed | {e})
            if new - current < tau:
                removed.add(e)
                current = new
    return set(every) - removed


def test_acdc_equals_a_naive_reference_implementation(setup):
    model, dataset, tokens, graph = setup
    tau = 0.02
    circuit = acdc(model, dataset, tau=tau, progress=False)
    assert circuit.edges == naive_acdc(model, tokens, graph, tau)
    assert 0 < len(circuit) < graph.n_edges
    assert circuit.scores.attrs["method"] == "acdc" and circuit.scores.attrs["tau"] == tau


def test_acdc_extremes_and_candidates(setup):
    model, dataset, _, graph = setup
    assert len(acdc(model, dataset, tau=1e9, progress=False)) == 0
    every = list(graph.edges())
    logit_edges = [e for e in every if e.receiver.kind is NodeKind.LOGITS]
    kept = acdc(model, dataset, tau=-1.0, candidates=logit_edges, progress=False)
    assert kept.edges == set(logit_edges)  # a negative tau keeps every candidate
    with pytest.raises(ValueError, match="not edges"):
        acdc(model, dataset, candidates=[Edge(Node(NodeKind.MLP, 2), Node(NodeKind.MLP, 0), Channel.IN)])


def test_acdc_resumes_from_its_checkpoint(setup, tmp_path, monkeypatch):
    model, dataset, _, _ = setup
    path = tmp_path / "acdc.json"
    import patchlab.acdc_search as acdc_module

    real, saves = acdc_module._save, []

    def stop_after_three(p, state):
        real(p, state)
        saves.append(state["done"])
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(acdc_module, "_save", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        acdc(model, dataset, tau=0.02, checkpoint=path, progress=False)
    monkeypatch.setattr(acdc_module, "_save", real)
    assert json.loads(path.read_text())["done"] == 3
    resumed = acdc(model, dataset, tau=0.02, checkpoint=path, progress=False)
    assert resumed.edges == acdc(model, dataset, tau=0.02, progress=False).edges
    with pytest.raises(ValueError, match="another ACDC search"):
        acdc(model, dataset, tau=0.5, checkpoint=path, progress=False)


# ---------------------------------------------------------------- circuits, agreement, AUC

def small_scores(values, graph=Graph(n_layers=2, n_heads=2, n_kv_heads=2)):
    edges = list(graph.edges())[:len(values)]
    return edges, edge_scores(edges, values, graph=graph, attrs={"method": "x", "units": "nats"})


def test_circuit_round_trips_through_netcdf_and_json(tmp_path):
    edges, scores = small_scores([0.5, -2.0, 0.1, 1.0])
    circuit = Circuit.top_k(scores, 2)
    assert circuit.edges == {edges[1], edges[3]} and rank_edges(scores)[:2] == [edges[1], edges[3]]
    back = Circuit.load(circuit.save(tmp_path / "c.nc"))
    assert back.edges == circuit.edges and back.graph == circuit.graph
    xr.testing.assert_allclose(back.scores["score"], circuit.scores["score"])
    obj = json.loads(json.dumps(circuit.to_json(tmp_path / "c.json")))
    assert [e["edge"] for e in obj["edges"]] == [e.label for e in sorted(circuit.edges)]
    assert obj["edges"][0]["score"] in (-2.0, 1.0)
    g = circuit.to_networkx()
    assert g.number_of_edges() == 2 and Circuit.threshold(scores, 0.5).edges == {edges[0], edges[1], edges[3]}


def test_connected_keeps_only_paths_from_embeddings_to_logits():
    graph = Graph(n_layers=2, n_heads=2, n_kv_heads=1)
    e = lambda lab: Edge.from_label(lab)
    edges = [e("embed->L0KV0.k"), e("L0H1->logits"), e("L0H0->L1H0.q"), e("embed->L1.mlp")]
    scores = edge_scores(edges, [1.0, 1.0, 1.0, 1.0], graph=graph)
    assert Circuit(graph, edges, scores).connected().edges == {edges[0], edges[1]}  # via the key/value head


def test_agreement_by_hand():
    _, a = small_scores([3.0, 2.0, 1.0, -0.5])
    _, b = small_scores([3.5, -1.0, 1.2, 0.1])
    report = agreement(a, b, top_k=(1, 2, 9))
    assert list(report["k"].values) == [1, 2]
    assert list(report["top_k_overlap"].values) == [1.0, 0.5]  # top-2: {0,1} vs {0,2}
    assert report.attrs["spearman"] == pytest.approx(0.4)  # ranks 4,3,2,1 vs 4,1,3,2: 1 - 6*6/(4*15)
    assert report["failure_mode"].values[0] == "sign" and report["edge"].values[0] == str(a["edge"].values[1])
    _, other = small_scores([1.0])
    other.attrs["units"] = "1"
    with pytest.raises(ValueError, match="units"):
        agreement(a, other)


def test_roc_auc_by_hand():
    edges, scores = small_scores([0.9, -0.8, 0.1, 0.5, 0.0])
    assert roc_auc(scores, [edges[0], edges[1]]) == 1.0
    assert roc_auc(scores, [edges[4]]) == 0.0
    assert roc_auc(scores, [edges[2], edges[3]]) == pytest.approx(2 / 6)  # 0.1 beats 0.0; 0.5 beats 0.1, 0.0
    with pytest.raises(ValueError, match="ROC AUC"):
        roc_auc(scores, [Edge.from_label("L1H1->logits")])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_algorithm_runs_on_every_family(family):
    """EAP/EAP-IG and edge patching are checked against references on every family elsewhere;
    here every algorithm that builds on them runs end to end and keeps its invariants."""
    model = tiny_patch_model(family)
    hf = model.hf
    dataset = random_pairs(hf.config.vocab_size)
    graph = Graph.from_model(model)
    scores = pl.eap_ig(model, dataset, steps=2)
    top = rank_edges(scores)[:10]
    exact = exact_edge_scores(model, dataset, edges=top, progress=False)
    assert np.isfinite(exact["score"].values).all() and agreement(scores, exact).attrs["n_edges"] == 10
    curve = faithfulness_curve(model, dataset, scores, sizes=[0, graph.n_edges], progress=False)
    np.testing.assert_allclose(curve["faithfulness"].values, [0.0, 1.0], atol=EXACT)
    circuit = acdc(model, dataset, tau=0.05, candidates=top, progress=False)
    assert circuit.edges <= set(top) and circuit.scores.attrs["n_evaluated"] <= 10
    found = pl.iterative_path_patching(model, dataset, threshold=0.2, max_depth=2, progress=False)
    assert all(e.sender in graph.senders_into(e.receiver) for e in found.edges)
