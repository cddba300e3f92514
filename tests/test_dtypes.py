"""Every algorithm runs in every dtype the adapters accept, with metrics in at least float32.

Each result in float32, bfloat16 and float16 is compared with the same computation in float64
(itself checked against the hook reference elsewhere): within `ULPS` units of the dtype's
precision, relative to the largest magnitude of the float64 result. Measured on these tiny
models: float32 within 14 ulps, bfloat16 within 8, float16 within 7; a patching mistake (a
wrong position, head or run) changes values by a large fraction of their magnitude, which
the half-precision bounds (a relative 0.5 for bfloat16, 0.06 for float16) still catch for
float16 and catch as a NaN, an infinity or a sign flip for bfloat16.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import patchlab as pl
from patchlab.facts import Fact, FactDataset
from patchlab.graph import Channel, Edge, Node, NodeKind
from patchlab.metrics import Metric, Targets
from patchlab.patching import run_pair
from patchlab.runner import patch_rows

from .test_patching_exact import random_pairs
from .tiny_models import tiny_patch_model

ULPS = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FAMILIES = ("gpt2", "llama", "gemma2")  # Conv1D and a fused q/k/v; grouped-query; post-norms in float32
LOGITS = Node(NodeKind.LOGITS)
FACTS = FactDataset(facts=(Fact("w1 w2 w3 w4 w5 w6", "w2 w3", " w9"), Fact("w7 w8 w9 w10", "w10", " w3")))

ALGORITHMS = {  # name -> (call, the result's variable compared)
    "patch_layer_pos": (lambda m, d: pl.patch_layer_pos(m, d, site="resid_mid", progress=False), "patched"),
    "patch_heads": (lambda m, d: pl.patch_heads(m, d, site="k", per_position=True, progress=False), "patched"),
    "patch_components": (lambda m, d: pl.patch_components(m, d, [pl.Component(site="v", layer=1, head=0)],
                                                          metric="kl", progress=False), "patched"),
    "path_patch_heads": (lambda m, d: pl.path_patch_heads(m, d, progress=False), "patched"),
    "patch_senders_into": (lambda m, d: pl.patch_senders_into(m, d, LOGITS, "in", progress=False), "patched"),
    "eap": (lambda m, d: pl.eap(m, d), "score"),
    "eap_ig": (lambda m, d: pl.eap_ig(m, d, steps=2), "score"),
    "exact_edge_scores": (lambda m, d: pl.exact_edge_scores(m, d, edges=[Edge(Node(NodeKind.HEAD, 0, 1), LOGITS,
                                                                              Channel.IN)], progress=False), "score"),
    "evaluate_circuits": (lambda m, d: pl.evaluate_circuits(m, d, [pl.Circuit.top_k(pl.eap(m, d), 20)],
                                                            ablation="mean", progress=False), "metric"),
    "causal_trace": (lambda m, d: pl.causal_trace(m, FACTS, samples=2, window=2, progress=False), "prob"),
}


@functools.cache
def result(family: str, dtype: torch.dtype, name: str):
    model = tiny_patch_model(family, dtype=dtype)
    call, _ = ALGORITHMS[name]
    return call(model, random_pairs(model.hf.config.vocab_size))


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_algorithm_runs_in_every_dtype(family, dtype, name):
    var = ALGORITHMS[name][1]
    got, expected = result(family, dtype, name)[var], result(family, torch.float64, name)
    # magnitude of the metric values a result comes from: edge scores are differences of them
    scale = max([abs(float(expected.attrs[k])) for k in ("clean_mean", "corrupted_mean") if k in expected.attrs]
                + [np.nanmax(np.abs(expected[var].values))])
    expected = expected[var]
    assert got.dtype == np.float64 and got.dims == expected.dims
    finite = np.isfinite(expected.values)  # NaN marks what does not exist (no path, beyond a prompt)
    assert (np.isfinite(got.values) == finite).all()
    tol = ULPS * torch.finfo(dtype).eps * scale
    err = np.abs(got.values[finite] - expected.values[finite]).max()
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_metrics_are_computed_in_at_least_float32(dtype):
    model = tiny_patch_model("llama", dtype=dtype)
    assert model.dtype == dtype and next(model.hf.parameters()).dtype == dtype
    tokens = random_pairs(model.hf.config.vocab_size).tokenize(model.tokenizer)
    out = patch_rows(model, passes=[run_pair(tokens)], base="corrupted", source="clean",
                     base_ids=tokens.corrupted_ids, rows=[(pl.Component(site="mlp_out", layer=1),)],
                     metric=Metric.LOGPROB, targets=Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids),
                     progress=False)
    assert out.values.dtype == torch.float32 and out.runs["clean"].dtype == torch.float32


def test_acdc_and_iterative_path_patching_run_in_half_precision():
    model = tiny_patch_model("llama", dtype=torch.bfloat16)
    dataset = random_pairs(model.hf.config.vocab_size)
    circuit = pl.acdc(model, dataset, tau=0.5, candidates=pl.circuit.rank_edges(pl.eap(model, dataset))[:6],
                      progress=False)
    assert np.isfinite(circuit.scores["score"].values).all()
    walk = pl.iterative_path_patching(model, dataset, threshold=0.5, progress=False)
    assert np.isfinite(walk.scores["score"].values).all()
