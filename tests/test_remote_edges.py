"""Edge patching and everything built on it give the same results through nnsight's
in-process remote simulation (``remote="local"``: serialization round trip with local
modules hidden) as locally, in the request budget their docstrings state."""

from __future__ import annotations


import numpy as np
import pytest
import xarray as xr

import patchlab.graph_runner as graph_runner
from patchlab.acdc_search import acdc
from patchlab.circuit import Circuit, edge_scores
from patchlab.edges import patch_edges, patch_senders_into
from patchlab.exact import exact_edge_scores
from patchlab.faithfulness import evaluate_circuits, faithfulness_curve
from patchlab.graph import Graph, Node, NodeKind

from .test_patching_exact import random_pairs
from .tiny_models import tiny_patch_model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model = tiny_patch_model(request.param)
    hf = model.hf
    graph = Graph.from_model(model)
    return model, random_pairs(hf.config.vocab_size), graph, list(graph.edges())


@pytest.fixture
def requests(monkeypatch):
    """The `remote` argument of every program execution of the edge runner."""
    seen, real = [], graph_runner.execute

    def counted(model, program, *args, remote=None):
        seen.append(remote)
        return real(model, program, *args, remote=remote)

    monkeypatch.setattr(graph_runner, "execute", counted)
    return seen


def assert_same(local: xr.Dataset, remote: xr.Dataset) -> None:
    """Identical data variables and coords (dataset attrs carry a timestamp)."""
    xr.testing.assert_identical(local.drop_attrs(deep=False), remote.drop_attrs(deep=False))


def test_patch_edges_and_senders_into(setup, requests):
    model, dataset, graph, every = setup
    sets = [(), every[:1], every[5:9], every[::3], every[1:]]  # small and complement-form sets
    local = patch_edges(model, dataset, sets, progress=False)
    assert_same(local, patch_edges(model, dataset, sets, remote="local"))
    receiver = Node(NodeKind.KV_HEAD if graph.gqa else NodeKind.HEAD, 2, 1)
    local = patch_senders_into(model, dataset, receiver, "k", direction="denoising", progress=False)
    assert_same(local, patch_senders_into(model, dataset, receiver, "k", direction="denoising", remote="local"))
    assert requests == [None, "local"] * 2  # one request each


def test_exact_edge_scores(setup, requests):
    model, dataset, _, every = setup
    edges = every[::17]
    local = exact_edge_scores(model, dataset, edges=edges, block=8, progress=False)
    n_local = len(requests)
    remote = exact_edge_scores(model, dataset, edges=edges, block=8, progress=False, remote="local")
    assert_same(local, remote)
    assert len(edges) > 8 and requests[n_local:] == ["local"] * -(-len(edges) // 8)  # one request per block


def test_acdc(setup, requests):
    model, dataset, _, every = setup
    candidates = [e for e in every if e.receiver.kind is NodeKind.LOGITS][-3:] + every[-30::15]
    local = acdc(model, dataset, tau=0.02, candidates=candidates, progress=False)
    n_local = len(requests)
    remote = acdc(model, dataset, tau=0.02, candidates=candidates, progress=False, remote="local")
    assert remote.edges == local.edges
    assert_same(local.scores, remote.scores)
    assert requests[n_local:] == ["local"] * (1 + remote.scores.attrs["n_evaluated"])


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_evaluate_circuits_and_faithfulness_curve(setup, requests, ablation):
    model, dataset, graph, every = setup
    scores = edge_scores(every, np.random.default_rng(0).normal(size=len(every)), graph=graph)
    circuits = [Circuit(graph, every[::7], scores), Circuit(graph, every[:20], scores)]
    kwargs = dict(ablation=ablation, level="edge" if ablation == "resample" else "node", progress=False)
    local = evaluate_circuits(model, dataset, circuits, **kwargs)
    assert_same(local, evaluate_circuits(model, dataset, circuits, remote="local", **kwargs))
    local = faithfulness_curve(model, dataset, scores, sizes=[0, 10, len(every)], metric="kl", **kwargs)
    assert_same(local, faithfulness_curve(model, dataset, scores, sizes=[0, 10, len(every)], metric="kl",
                                          remote="local", **kwargs))
    assert requests == [None, "local"] * 2


def test_local_runs_cache_once_for_every_block(setup, requests):
    """Running here, the runs are cached once (remote=False) and every block reuses the cache."""
    model, dataset, _, every = setup
    exact_edge_scores(model, dataset, edges=every[:6], block=2, progress=False)
    assert requests == [False] + [None] * 3


def test_a_channel_the_receiver_lacks_is_refused():
    model = tiny_patch_model("llama")
    hf = model.hf
    with pytest.raises(ValueError, match="not an edge"):  # GQA: k edges go to the key/value head
        patch_senders_into(model, random_pairs(hf.config.vocab_size), Node(NodeKind.HEAD, 2, 1), "k", progress=False)
