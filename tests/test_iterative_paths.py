"""Iterative path patching equals direct `path_patch_heads` sweeps, walks the graph as documented,
maps grouped-query k/v edges onto key/value heads, resumes from a checkpoint and is deterministic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import patchlab as pl
import patchlab.iterative_paths as ip
from patchlab.circuit import Circuit
from patchlab.graph import Channel, Edge, Graph, Node, NodeKind
from patchlab.iterative_paths import iterative_path_patching
from patchlab.paths import path_patch_heads

from .test_patching_exact import random_pairs
from .tiny_models import tiny_patch_model

LOGITS = Node(NodeKind.LOGITS)
WALK = dict(threshold=0.0, max_depth=2, max_receivers_per_step=3, progress=False)
"""Every head is found at step 0; the 3 with the largest direct effect (outside layer 0) are swept at step 1."""


def load(family):
    model = tiny_patch_model(family)
    return model, random_pairs(model.hf.config.vocab_size)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def walk(request):
    model, dataset = load(request.param)
    return model, dataset, iterative_path_patching(model, dataset, **WALK)


def table(circuit):
    """{edge: (path effect, normalised, depth)} of every evaluated edge."""
    s = circuit.scores
    return {Edge.from_label(str(lab)): (float(e), float(n), int(d))
            for lab, e, n, d in zip(s.edge.values, s.score.values, s.normalised.values, s.depth.values)}


def spy(monkeypatch, fail_at=None):
    """Record the receivers of each `path_patch_heads` call made by the module; raise at call `fail_at`."""
    calls = []

    def wrapped(model, dataset, *, receivers, **kw):
        calls.append("logits" if isinstance(receivers, str) else receivers[0].label)
        if len(calls) == fail_at:
            raise RuntimeError("interrupted")
        return path_patch_heads(model, dataset, receivers=receivers, **kw)

    monkeypatch.setattr(ip, "path_patch_heads", wrapped)
    return calls


def test_step0_equals_direct_path_patching_to_logits(walk):
    model, dataset, circuit = walk
    direct = path_patch_heads(model, dataset, receivers="logits", freeze_mlps=True, progress=False)
    effect = direct.patched.mean("prompt") - direct.clean.mean("prompt")  # noising: the base run is clean
    got = table(circuit)
    for layer in range(model.layout.n_layers):
        for head in range(model.layout.n_heads):
            e, n, d = got[Edge(Node(NodeKind.HEAD, layer, head), LOGITS, Channel.IN)]
            assert d == 0 and e == pytest.approx(float(effect.sel(layer=layer, head=head)), abs=1e-9)
            assert n == pytest.approx(float(direct.score.sel(layer=layer, head=head)), abs=1e-9)
    gap = direct.clean.mean() - direct.corrupted.mean()
    assert n == pytest.approx(-e / float(gap))  # normalised = fraction of the clean-corrupted gap
    attrs = circuit.scores.attrs
    assert (attrs["method"], attrs["metric"], attrs["units"], attrs["direction"]) == \
        ("iterative_path_patching", "logit_diff", "nats", "noising")
    assert (attrs["threshold"], attrs["max_depth"], attrs["freeze_mlps"]) == (0.0, 2, 1)
    assert attrs["model_sha256"] == model.weights_sha256 and attrs["dataset_sha256"] == dataset.sha256()


def test_step_d_equals_direct_path_patching_to_the_receiver(walk):
    model, dataset, circuit = walk
    got, lay = table(circuit), model.layout
    receivers = sorted({e.receiver for e, (_, _, d) in got.items() if d == 1 and e.channel is Channel.Q})
    assert receivers, "the walk swept no receiver head"
    head = receivers[-1]
    direct = path_patch_heads(model, dataset, receivers=[head], channels=("q", "k", "v"), freeze_mlps=True,
                              progress=False)
    effect = direct.patched.mean("prompt") - direct.clean.mean("prompt")
    kv = Node(NodeKind.KV_HEAD if lay.n_kv_heads != lay.n_heads else NodeKind.HEAD, head.layer,
              head.head // (lay.n_heads // lay.n_kv_heads))
    for channel, into in ((Channel.Q, head), (Channel.K, kv), (Channel.V, kv)):
        for layer in range(head.layer):
            for h in range(lay.n_heads):
                e, n, _ = got[Edge(Node(NodeKind.HEAD, layer, h), into, channel)]
                sel = dict(channel=channel.value, layer=layer, head=h)
                assert e == pytest.approx(float(effect.sel(**sel)), abs=1e-9)
                assert n == pytest.approx(float(direct.score.sel(**sel)), abs=1e-9)


def test_walk_sweeps_the_top_heads_and_keeps_edges_above_threshold(walk):
    model, _, circuit = walk
    got = table(circuit)
    step0 = {e.sender: abs(n) for e, (_, n, d) in got.items() if d == 0}
    assert len(step0) == model.layout.n_layers * model.layout.n_heads
    top3 = sorted((h for h in step0 if h.layer > 0), key=lambda h: (-step0[h], h))[:3]  # layer 0: no senders
    swept = {e.receiver for e, (_, _, d) in got.items() if d == 1 and e.channel is Channel.Q}
    assert swept == set(top3)
    assert {d for *_, d in got.values()} <= {0, 1}  # max_depth=2: two steps
    assert circuit.edges == frozenset(got)  # threshold 0 keeps every evaluated edge


def test_threshold_extremes():
    model, dataset = load("gpt2")
    everything = iterative_path_patching(model, dataset, threshold=0.0, max_depth=1, progress=False)
    heads = [Node(NodeKind.HEAD, layer, h) for layer in range(model.layout.n_layers) for h in range(model.layout.n_heads)]
    assert everything.edges == frozenset(Edge(h, LOGITS, Channel.IN) for h in heads)
    nothing = iterative_path_patching(model, dataset, threshold=1e9, max_depth=3, progress=False)
    assert len(nothing) == 0 and nothing.scores.sizes["edge"] == len(heads)  # stops after step 0
    np.testing.assert_array_equal(nothing.scores.score.values, everything.scores.score.values)
    middle = float(np.median(np.abs(everything.scores.normalised.values)))
    some = iterative_path_patching(model, dataset, threshold=middle, max_depth=1, progress=False)
    assert some.edges == frozenset(e for e, (_, n, _) in table(everything).items() if abs(n) >= middle)
    assert 0 < len(some) < len(heads)


def test_gqa_kv_edges_go_to_key_value_heads_of_the_graph(monkeypatch):
    model, dataset = load("llama")
    graph = Graph.from_model(model)
    assert graph.gqa
    calls = spy(monkeypatch)
    circuit = iterative_path_patching(model, dataset, threshold=0.0, max_depth=2, channels=("k", "v"), progress=False)
    got = table(circuit)
    for edge in got:
        assert edge.receiver in graph.nodes and edge.sender in graph.senders_into(edge.receiver)
        assert edge.receiver.kind is (NodeKind.LOGITS if edge.channel is Channel.IN else NodeKind.KV_HEAD)
    expected = {e for e in graph.edges() if e.sender.kind is NodeKind.HEAD
                and e.receiver.kind in (NodeKind.KV_HEAD, NodeKind.LOGITS)}
    assert set(got) == expected
    # one sweep per key/value head, by one query head of its group, in layers 1 and 2 (layer 0 has no senders)
    groups = [(n.layer, n.head // 2) for n in map(Node.from_label, calls[1:])]
    assert calls[0] == "logits" and sorted(groups) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_resume_after_an_interruption_skips_finished_receivers(walk, tmp_path, monkeypatch):
    model, dataset, uninterrupted = walk
    path = tmp_path / "walk.json"
    first = spy(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        iterative_path_patching(model, dataset, checkpoint=path, **WALK)
    assert first[0] == "logits" and len(first) == 3
    saved = json.loads(path.read_text())["sweeps"]
    assert "logits" in saved and f"{first[1]}.q" in saved and first[2] + ".q" not in saved

    resumed_calls = spy(monkeypatch)
    resumed = iterative_path_patching(model, dataset, checkpoint=path, **WALK)
    swept = sorted({e.receiver.label for e, (_, _, d) in table(uninterrupted).items()
                    if d == 1 and e.channel is Channel.Q})
    assert sorted(resumed_calls + first[:2]) == sorted(["logits"] + swept)
    assert resumed.edges == uninterrupted.edges
    for var in ("score", "normalised", "depth"):
        np.testing.assert_array_equal(resumed.scores[var].values, uninterrupted.scores[var].values)
    np.testing.assert_array_equal(resumed.scores.edge.values, uninterrupted.scores.edge.values)

    again = spy(monkeypatch)
    iterative_path_patching(model, dataset, checkpoint=path, **WALK)
    assert again == []  # everything is in the checkpoint
    iterative_path_patching(model, dataset, checkpoint=path, **{**WALK, "max_receivers_per_step": 4})
    assert len(again) == 1 and again[0] not in swept  # another walk reuses the saved sweeps
    with pytest.raises(ValueError, match="another configuration.*direction"):
        iterative_path_patching(model, dataset, checkpoint=path, **{**WALK, "direction": "denoising"})


def test_two_runs_give_identical_scores(walk, tmp_path):
    model, dataset, circuit = walk
    again = iterative_path_patching(model, dataset, **WALK)
    assert again.edges == circuit.edges
    for var in ("edge", "score", "normalised", "depth"):
        np.testing.assert_array_equal(again.scores[var].values, circuit.scores[var].values)
    circuit.save(tmp_path / "circuit.nc")  # attrs are netCDF-safe
    loaded = Circuit.load(tmp_path / "circuit.nc")
    assert loaded.edges == circuit.edges and loaded.scores.attrs["method"] == "iterative_path_patching"


def test_no_clean_corrupted_gap_is_refused():
    model, dataset = load("gpt2")
    same = pl.PromptPairDataset(pairs=[dataclasses.replace(p, corrupted=p.clean) for p in dataset.pairs],
                                name="same", corruption="none")
    with pytest.raises(pl.BaselineGapError, match="too small to normalise"):
        iterative_path_patching(model, same, progress=False)


def test_bad_arguments_are_refused():
    model, dataset = load("gpt2")
    for kw, match in [(dict(channels=["in"]), "channels"), (dict(channels=[]), "channels"),
                      (dict(threshold=-0.1), "threshold"), (dict(threshold=float("nan")), "threshold"),
                      (dict(max_depth=0), "max_depth"), (dict(max_receivers_per_step=0), "max_receivers_per_step")]:
        with pytest.raises(ValueError, match=match):
            iterative_path_patching(model, dataset, progress=False, **kw)
