"""EdgePlanner: a plan reused across calls that change a few edges equals a plan made from scratch,
and replans only the receiver channels whose edges changed."""

from __future__ import annotations

import random

import pytest
import torch

from patchlab.edge_plan import EdgePlanner
from patchlab.graph import Graph
from patchlab.graph_runner import edge_patch_rows

from .test_patching_exact import N_POS, random_pairs
from .tiny_models import tiny_patch_model


def _scratch(model, graph, row):
    """The row's summary and keys through the many-row path of a planner that never saw it."""
    planner = EdgePlanner(model, graph, N_POS)
    summary = planner.summary(row)
    planner.summary(frozenset())  # forget the row: keys() then groups it afresh
    return summary, planner.keys([row], [summary[1]])


def _same_keys(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for name in x:
            u, v = x[name], y[name]
            if isinstance(u, dict):
                if u.keys() != v.keys() or not all(torch.equal(u[k], v[k]) for k in u):
                    return False
            elif isinstance(u, torch.Tensor):
                if not torch.equal(u, v):
                    return False
            elif u != v:
                return False
    return True


@pytest.mark.parametrize("family,n_pos", [("gpt2", None), ("llama", None), ("gpt2", N_POS)])
def test_reused_plan_equals_a_plan_from_scratch(family, n_pos, monkeypatch):
    model = tiny_patch_model(family)
    graph = Graph.from_model(model, n_pos=n_pos)
    every = list(graph.edges())
    rng = random.Random(0)
    planner = EdgePlanner(model, graph, N_POS)
    replanned = []
    real = EdgePlanner._key_plan
    monkeypatch.setattr(EdgePlanner, "_key_plan", lambda self, key, *a: replanned.append(key) or real(self, key, *a))
    # an ACDC-like walk: most edges removed (complement form on many receivers), one or two change per step
    removed = set(rng.sample(every, int(0.9 * len(every))))
    previous = None
    for step in range(25):
        row = frozenset(removed)
        replanned.clear()
        summary = planner.summary(row)
        keys = planner.keys([row], [summary[1]])
        if previous is not None:
            changed = {(e.receiver, e.channel) for e in row ^ previous}
            assert set(replanned) <= changed, "a receiver whose edges did not change was replanned"
        want_summary, want_keys = _scratch(model, graph, row)
        assert summary == want_summary
        assert _same_keys(keys, want_keys)
        previous = row
        for edge in rng.sample(every, rng.choice([1, 2])):
            (removed.discard if edge in removed else removed.add)(edge)


def test_planner_keeps_values_exact_over_a_walk():
    """edge_patch_rows with one planner kept across calls gives the values of calls without it."""
    model = tiny_patch_model("gpt2")
    graph = Graph.from_model(model)
    tokens = random_pairs(model.hf.config.vocab_size).tokenize(model.tokenizer)
    every = list(graph.edges())
    rng = random.Random(1)
    planner = EdgePlanner(model, graph, N_POS)
    removed = set(rng.sample(every, len(every) // 2))
    for _ in range(4):
        kept = edge_patch_rows(model, graph, tokens=tokens, rows=[removed], metric="logit_diff", progress=False,
                               planner=planner).values
        fresh = edge_patch_rows(model, graph, tokens=tokens, rows=[removed], metric="logit_diff",
                                progress=False).values
        assert torch.equal(kept, fresh)
        removed ^= {rng.choice(every)}


def test_planner_of_another_width_is_refused():
    model = tiny_patch_model("gpt2")
    graph = Graph.from_model(model)
    tokens = random_pairs(model.hf.config.vocab_size).tokenize(model.tokenizer)
    with pytest.raises(ValueError, match="another graph or prompt width"):
        edge_patch_rows(model, graph, tokens=tokens, rows=[[]], metric="logit_diff", progress=False,
                        planner=EdgePlanner(model, graph, N_POS + 1))
