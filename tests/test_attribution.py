"""EAP and EAP-IG equal the derivative of exact edge patching, computed independently.

The reference is `tests.reference_graph` (plain PyTorch hooks, no patchlab, no nnsight):
patch one edge with ``out_s(current) + eps * (out_s(source) - out_s(base))`` and take a
central finite difference of the metric in float64. For EAP-IG the run whose gradient
is taken has its embeddings (block 0's input) moved to ``base + alpha (source - base)``
by a plain forward pre-hook.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

import patchlab as pl
from patchlab.attribution import eap, eap_ig
from patchlab.graph import Edge, Graph
from patchlab.metrics import Metric, Targets

from .reference import _block
from .reference_graph import _edge_run, reference_contributions
from .test_edges_exact import ref_edge
from .test_patching_exact import ALL_FAMILIES, random_pairs
from .tiny_models import tiny_model, tiny_tokenizer

EPS = 3e-3
# Eager attention in the Llama/Gemma/NeoX families takes its softmax in float32 even in a
# float64 model, so the reference carries ~1e-7 relative noise: a five-point stencil with a
# large step keeps that noise (/ EPS) and the truncation error (O(EPS**4)) near 1e-4. A
# wrong head slice, norm or sign gives errors of order one. (GPT-2 agrees to 1e-6.)
TOL = dict(abs=5e-4, rel=1e-4)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request):
    hf = tiny_model(request.param).double()
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=torch.float64,
                          model_id=f"tiny-{request.param}")
    dataset = random_pairs(hf.config.vocab_size)
    return model, dataset, dataset.tokenize(model.tokenizer)


@contextlib.contextmanager
def block0_input(hf, embed):
    """Replace the residual stream entering block 0 (None: leave it)."""
    def hook(module, args, kwargs):
        if args:
            return (embed,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": embed}

    handle = None if embed is None else _block(hf, 0).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def derivative(model, tokens, edge: Edge, alpha: float = 0.0) -> float:
    """d/d eps of the mean logit difference with `edge` moved by eps * (source - base), at the
    run whose embeddings are ``base + alpha (source - base)`` (noising: base = clean)."""
    hf, base_ids, source_ids = model.hf, tokens.clean_ids, tokens.corrupted_ids
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    base, source = reference_contributions(hf, base_ids), reference_contributions(hf, source_ids)
    step = {k: source[k] - base[k] for k in base}
    embed = None if alpha == 0 else base[("embed",)] + alpha * step[("embed",)]
    with block0_input(hf, embed):
        current = reference_contributions(hf, base_ids)
        values = {}
        for t in (-2, -1, 1, 2):
            moved = {k: current[k] + t * EPS * step[k] for k in current}
            logits, _ = _edge_run(hf, base_ids, [ref_edge(edge)], moved)
            values[t] = Metric.LOGIT_DIFF(logits, targets).mean()
    return float((values[-2] - 8 * values[-1] + 8 * values[1] - values[2]) / (12 * EPS))


def sample_edges(graph: Graph, n: int, seed: int = 0) -> list[Edge]:
    """One edge of every (sender kind, receiver kind, channel) and `n` more at random."""
    rng = random.Random(seed)
    edges = list(graph.edges())
    kinds = {}
    for e in edges:
        kinds.setdefault((e.sender.kind, e.receiver.kind, e.channel), e)
    return list(kinds.values()) + rng.sample(edges, n)


def score(ds, edge: Edge) -> float:
    return float(ds["score"].sel(edge=edge.label))


def test_eap_is_the_derivative_of_edge_patching(setup):
    model, dataset, tokens = setup
    ds = eap(model, dataset)
    graph = Graph.from_model(model)
    assert ds.sizes["edge"] == graph.n_edges and ds.attrs["method"] == "eap"
    for edge in sample_edges(graph, 6):
        assert score(ds, edge) == pytest.approx(derivative(model, tokens, edge), **TOL), edge.label


def test_token_specific_eap_sums_to_the_all_token_score(setup):
    model, dataset, tokens = setup
    all_token, per_pos = eap(model, dataset), eap(model, dataset, per_position=True)
    assert per_pos.sizes["edge"] == Graph.from_model(model).n_edges * tokens.n_pos
    edge = sample_edges(Graph.from_model(model), 1, seed=3)[-1]
    at = [score(per_pos, edge.with_pos(p)) for p in range(tokens.n_pos)]
    assert sum(at) == pytest.approx(score(all_token, edge), abs=1e-9)
    p = tokens.n_pos - 2
    assert at[p] == pytest.approx(derivative(model, tokens, edge.with_pos(p)), **TOL)


def test_eap_ig_averages_derivatives_along_the_embedding_path(setup):
    model, dataset, tokens = setup
    steps = 3
    ds = eap_ig(model, dataset, steps=steps)
    assert ds.attrs["ig_steps"] == steps
    for edge in sample_edges(Graph.from_model(model), 2, seed=1)[::3]:
        expected = np.mean([derivative(model, tokens, edge, alpha=k / steps) for k in range(steps)])
        assert score(ds, edge) == pytest.approx(expected, **TOL), edge.label


def test_one_step_eap_ig_is_eap(setup):
    model, dataset, _ = setup
    assert np.array_equal(eap_ig(model, dataset, steps=1)["score"].values, eap(model, dataset)["score"].values)


def test_denoising_swaps_the_runs():
    hf = tiny_model("gpt2").double()
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=torch.float64)
    dataset = random_pairs(hf.config.vocab_size)
    swapped = pl.PromptPairDataset(pairs=tuple(pl.PromptPair(clean=p.corrupted, corrupted=p.clean, correct=p.correct,
                                                       incorrect=p.incorrect) for p in dataset.pairs))
    a = eap(model, dataset, direction="denoising")
    b = eap(model, swapped, direction="noising")
    assert a.attrs["direction"] == "denoising"
    np.testing.assert_allclose(a["score"].values, b["score"].values, atol=1e-10)


def test_eap_ig_needs_a_step():
    hf = tiny_model("gpt2")
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))
    with pytest.raises(ValueError, match="at least one"):
        eap_ig(model, random_pairs(hf.config.vocab_size), steps=0)
