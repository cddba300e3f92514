"""Integration tests on the real SmolLM2-135M-Instruct (slow: ~2-3 min in all).

Exactness: every sweep kind equals the independent plain-hook reference on a subset of
layers, heads and positions, both sides in float64 (`tests.precision.EXACT`); two sweeps
also in float32, the dtype users run, within float32 precision. Behaviour: facts about IOI
on this model that hold by construction (whole-residual patches) or were measured
(MODELS.md: the model prefers the indirect object).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab as pl

from .precision import EXACT, float32_atol
from .test_patching_exact import reference_values

pytestmark = pytest.mark.slow


def ioi_pairs(model):
    dataset = pl.ioi_dataset(model.tokenizer, n_prompts=2, seed=0)
    return dataset, dataset.tokenize(model.tokenizer)


def test_architecture_is_detected(smollm2):
    lay = smollm2.layout
    assert smollm2.adapter.family == "llama"
    assert (lay.n_layers, lay.n_heads, lay.n_kv_heads, lay.d_head, lay.d_model) == (30, 9, 3, 64, 576)


def layer_pos_sweep(model, site):
    """patchlab's layer x position sweep at S2 and END of layers 0, 13, 29, and the reference."""
    dataset, tokens = ioi_pairs(model)
    ds = pl.patch_layer_pos(model, dataset, site=site, layers=[0, 13, 29], positions=["S2", "END"], progress=False)
    comps = [pl.Component(site=site, layer=int(layer), pos=int(p)) for layer in ds.layer for p in ds.pos]
    return torch.from_numpy(ds.patched.values).reshape(len(comps), -1), reference_values(model, tokens, comps,
                                                                                          "denoising")


def head_sweep(model, site, per_position, n_checked=24):
    """patchlab's head sweep of layers 3 and 21 (noising), and the reference: on every head, or
    per position on `n_checked` (layer, head, pos) components drawn with a fixed seed (the
    reference takes one forward pass per component)."""
    dataset, tokens = ioi_pairs(model)
    ds = pl.patch_heads(model, dataset, site=site, layers=[3, 21], per_position=per_position,
                        direction="noising", progress=False)
    pos = [int(p) for p in ds.pos] if per_position else [None]
    comps = [pl.Component(site=site, layer=int(layer), head=int(h), pos=p)
             for layer in ds.layer for h in ds["head"] for p in pos]
    got = torch.from_numpy(ds.patched.values).reshape(len(comps), -1)
    if per_position:
        rows = torch.randperm(len(comps), generator=torch.Generator().manual_seed(0))[:n_checked].sort().values
        comps, got = [comps[r] for r in rows], got[rows]
    return got, reference_values(model, tokens, comps, "noising")


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
def test_layer_pos_sweeps_equal_reference(smollm2_f64, site):
    got, expected = layer_pos_sweep(smollm2_f64, site)
    assert expected.dtype == torch.float64
    assert torch.allclose(got, expected, atol=EXACT, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("site,per_position",
                         [("head", False), ("head", True), ("q", False), ("k", False), ("v", False)])
def test_head_sweeps_equal_reference(smollm2_f64, site, per_position):
    got, expected = head_sweep(smollm2_f64, site, per_position)
    assert torch.allclose(got, expected, atol=EXACT, rtol=0), (got - expected).abs().max()


def test_float32_sweeps_agree_with_the_reference_to_float32_precision(smollm2):
    """The dtype users run: equal up to float32 rounding, which batch layout and CPU kernels move
    (tests/precision.py: 256 ulps of the magnitude)."""
    for got, expected in (layer_pos_sweep(smollm2, "resid_mid"), head_sweep(smollm2, "q", False)):
        assert got.dtype == torch.float64 and expected.dtype == torch.float32  # results are stored as float64
        tol = float32_atol(expected)
        assert torch.allclose(got, expected.double(), atol=tol, rtol=0), ((got - expected).abs().max(), tol)


def test_ioi_baselines_and_whole_residual_patches(smollm2):
    dataset = pl.ioi_dataset(smollm2.tokenizer, n_prompts=8, seed=0)
    tokens = dataset.tokenize(smollm2.tokenizer)
    s2, end = tokens.positions["S2"], tokens.positions["END"]
    ds = pl.patch_layer_pos(smollm2, dataset, layers=[0, 29], progress=False)
    # The model does IOI: it prefers the indirect object on clean prompts, the other name on corrupted ones.
    assert ds.clean.mean() > 2 and ds.corrupted.mean() < -2
    # name_swap changes only the S2 token: at layer 0 patching S2 restores everything, other positions nothing.
    assert np.allclose(ds.score.sel(layer=0, pos=s2), 1.0, atol=1e-4)
    others = [p for p in range(tokens.n_pos) if p != s2]
    assert np.abs(ds.score.sel(layer=0, pos=others)).max() < 1e-4
    # The final residual stream at the final position determines the output: patching it restores everything.
    last = pl.patch_layer_pos(smollm2, dataset, site="resid_post", layers=[29], positions=[end], progress=False)
    assert np.allclose(last.patched.sel(layer=29, pos=end), ds.clean, atol=1e-4)
    assert ds.pos_name.sel(pos=s2) == "S2" and ds.token.sel(pos=end).item().strip() == "to"


def test_edge_and_path_patching_equal_reference(smollm2_f64):
    """Graph-level patching on the real model, a few edges and paths, against tests.reference_graph."""
    from patchlab.edges import patch_edges
    from patchlab.graph import Channel, Edge, Node, NodeKind
    from patchlab.metrics import Metric, Targets
    from patchlab.patching import run_pair
    from patchlab.path_runner import path_patch_rows

    from .reference_graph import reference_edge_patched_logits, reference_path_patched_logits
    from .test_edges_exact import ref_edge

    smollm2 = smollm2_f64
    dataset = pl.ioi_dataset(smollm2.tokenizer, n_prompts=2, corruption="abc", seed=0)
    tokens = dataset.tokenize(smollm2.tokenizer)
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    head = lambda layer, h: Node(NodeKind.HEAD, layer, h)
    edge_sets = [(Edge(head(20, 0), head(23, 3), Channel.Q),),
                 (Edge(head(17, 4), Node(NodeKind.KV_HEAD, 23, 1), Channel.K, pos=tokens.positions["S2"]),),
                 (Edge(head(23, 3), Node(NodeKind.LOGITS), Channel.IN),
                  Edge(Node(NodeKind.MLP, 5), Node(NodeKind.MLP, 9), Channel.IN))]
    ds = patch_edges(smollm2, dataset, edge_sets, progress=False)
    for i, edges in enumerate(edge_sets):
        logits = reference_edge_patched_logits(smollm2.hf, tokens.clean_ids, tokens.corrupted_ids,
                                               [ref_edge(e) for e in edges])
        assert torch.allclose(torch.from_numpy(ds.patched.values[i]), Metric.LOGIT_DIFF(logits, targets), atol=EXACT)

    senders = [(head(20, 0),), (head(8, 1),), (Node(NodeKind.MLP, 3),)]
    receiver_sets = [[(head(23, 3), Channel.Q)], [(Node(NodeKind.LOGITS), Channel.IN)]]
    values = path_patch_rows(smollm2, passes=[run_pair(tokens)], base="clean", source="corrupted",
                             base_ids=tokens.clean_ids, rows=senders, receiver_sets=receiver_sets,
                             metric=Metric.LOGIT_DIFF, targets=targets, progress=False).values
    for r, (sender,) in enumerate(senders):
        ref_sender = ("mlp", sender.layer) if sender.kind is NodeKind.MLP else ("head", sender.layer, sender.head)
        for i, receivers in enumerate([[(("head", 23, 3), "q")], "logits"]):
            logits = reference_path_patched_logits(smollm2.hf, tokens.clean_ids, tokens.corrupted_ids, [ref_sender],
                                                   receivers)
            assert torch.allclose(values[i, r], Metric.LOGIT_DIFF(logits, targets), atol=EXACT)


def test_joint_interventions_equal_reference(smollm2_f64):
    """A joint set of every plain-data kind, at named and end-relative positions, on the real model
    in float64, against plain hooks."""
    from .test_interventions import reference_rows

    model = smollm2_f64
    dataset, tokens = ioi_pairs(model)
    C = pl.Component
    v = torch.linspace(-0.5, 0.5, model.layout.d_model, dtype=torch.float64)
    row = [pl.Ablate(C(site="head", layer=23, head=3), how="mean"), pl.Scale(C(site="head", layer=29, head=1), 0.0),
           pl.Patch(C(site="resid_pre", layer=10, pos=tokens.positions["S2"])),
           pl.Steer(C(site="resid_pre", layer=12, pos=tokens.n_pos - 1), v, scale=4.0),
           pl.Freeze(C(site="mlp_out", layer=20, pos=tokens.n_pos - 1)),
           pl.Ablate(C(site="v", layer=17, head=1), how="resample", seed=0)]
    expected = reference_rows(model, tokens, [row])[0]
    named = [row[0], row[1], pl.Patch(C(site="resid_pre", layer=10, pos="S2")),
             pl.Steer(C(site="resid_pre", layer=12, pos=-1), v, scale=4.0),
             pl.Freeze(C(site="mlp_out", layer=20, pos="END")), row[5]]
    got = pl.run_interventions(model, dataset, named[::-1])
    assert torch.allclose(torch.from_numpy(got.patched.values), expected, atol=EXACT, rtol=0), \
        (torch.from_numpy(got.patched.values) - expected).abs().max()
    assert (expected - torch.from_numpy(got.corrupted.values)).abs().max() > 0.1
