"""Input that used to give a silent wrong result, or a confusing error, now gives a clear one.

Each case names its cause and its fix; each test here failed on patchlab before issue 11
(a NaN/inf score, a truncated index, an `AttributeError`, a bare "'x' is not a valid Site").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import xarray as xr

import patchlab as pl
from patchlab.graph import Channel, Edge, Node, NodeKind
from patchlab.metrics import Metric, Targets
from patchlab.patching import run_pair
from patchlab.runner import patch_rows

from .test_patching_exact import random_pairs
from .tiny_models import tiny_model, tiny_patch_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_patch_model("llama")


@pytest.fixture(scope="module")
def dataset(model):
    return random_pairs(model.hf.config.vocab_size)


def identical(dataset):
    """The same prompts as clean and corrupted: no gap at all."""
    return pl.PromptPairDataset(pairs=[dataclasses.replace(p, corrupted=p.clean) for p in dataset.pairs],
                                name="same", corruption="none")


def cancelling(dataset):
    """Each pair and its mirror (clean and corrupted swapped): per-prompt gaps d and -d, mean 0."""
    pairs = [dataset.pairs[0], dataclasses.replace(dataset.pairs[0], clean=dataset.pairs[0].corrupted,
                                                   corrupted=dataset.pairs[0].clean)]
    return pl.PromptPairDataset(pairs=pairs, name="mirrored", corruption="swap")


# ---- zero or cancelling baseline gap ---------------------------------------------------------------


ALGORITHMS = {
    "patch_layer_pos": lambda m, d: pl.patch_layer_pos(m, d, progress=False),
    "patch_heads": lambda m, d: pl.patch_heads(m, d, progress=False),
    "patch_components": lambda m, d: pl.patch_components(m, d, [pl.Component(site="mlp_out", layer=1)],
                                                         progress=False),
    "patch_edges": lambda m, d: pl.patch_edges(m, d, [[Edge(Node(NodeKind.MLP, 0), Node(NodeKind.LOGITS),
                                                             Channel.IN)]], progress=False),
    "path_patch_heads": lambda m, d: pl.path_patch_heads(m, d, progress=False),
    "eap": lambda m, d: pl.eap(m, d),
    "exact_edge_scores": lambda m, d: pl.exact_edge_scores(m, d, edges=[Edge(Node(NodeKind.EMBED),
                                                                             Node(NodeKind.LOGITS), Channel.IN)],
                                                           progress=False),
    "evaluate_circuits": lambda m, d: pl.evaluate_circuits(m, d, [], progress=False),
    "iterative_path_patching": lambda m, d: pl.iterative_path_patching(m, d, progress=False),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("make", [identical, cancelling], ids=["identical", "cancelling"])
def test_no_baseline_gap_is_an_error_not_nan_scores(model, dataset, name, make):
    with pytest.raises(pl.BaselineGapError, match="too small to normalise") as error:
        ALGORITHMS[name](model, make(dataset))
    assert ("identical runs" if make is identical else "gaps cancel") in str(error.value)


def test_a_sweep_stops_before_its_patched_passes_when_there_is_no_gap(model, dataset):
    """The check runs inside the program, right after the clean and corrupted runs: one forward pass."""
    calls = []
    handle = model.hf.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(pl.BaselineGapError):
            pl.patch_heads(model, identical(dataset), progress=False)
        assert len(calls) == 1
        calls.clear()
        pl.patch_heads(model, dataset, progress=False)
        assert len(calls) > 1
    finally:
        handle.remove()


def test_faithfulness_refuses_an_ablation_that_changes_nothing(model, dataset):
    """Mean ablation over one prompt is that prompt's corrupted run; with identical prompts the empty
    circuit is the full model."""
    one = pl.PromptPairDataset(pairs=dataset.pairs[:1])
    with pytest.raises(pl.BaselineGapError):
        pl.evaluate_circuits(model, identical(one), [], ablation="mean", progress=False)


def test_the_gap_rule_by_hand():
    from patchlab.kernels.common import gap_too_small

    t = torch.tensor
    assert gap_too_small(t([1.0, 2.0]), t([1.0, 2.0]))  # identical
    assert gap_too_small(t([3.0, -3.0]), t([-3.0, 3.0]))  # cancelling: mean gap 0
    assert gap_too_small(t([5.0, -4.95]), t([0.0, 0.0]))  # mean gap 0.025 < 1% of the mean |gap| 4.975
    assert not gap_too_small(t([5.0, -4.0]), t([0.0, 0.0]))  # 0.5 >= 1% of 4.5
    assert gap_too_small(t([1.0 + 1e-7]), t([1.0]))  # below 1e-6 metric units
    assert not gap_too_small(t([1.0 + 1e-5]), t([1.0]))
    assert gap_too_small(t([float("nan")]), t([1.0]))


def test_plot_sweep_refuses_scores_a_zero_gap_made(model, dataset):
    ds = pl.patch_layer_pos(model, dataset, layers=[0], progress=False)
    broken = ds.assign(score=ds.score * np.inf)
    with pytest.raises(ValueError, match="infinite"):
        pl.plot_sweep(broken)
    with pytest.raises(ValueError, match="no gap to normalise by"):
        pl.plot_sweep(ds.assign(score=ds.score * np.nan))
    path = pl.path_patch_heads(model, dataset, receivers=[Node(NodeKind.HEAD, 1, 0)], progress=False)
    assert np.isnan(path.score.sel(layer=2)).all()  # no path from the receiver's own layer: drawn blank
    import matplotlib.pyplot as plt

    plt.close(pl.plot_sweep(path.sel(channel="q")))


# ---- answers, indices, components ----------------------------------------------------------------


def test_answers_with_different_text_and_the_same_token_are_refused():
    tok = tiny_tokenizer()
    pair = pl.PromptPair(clean="w1 w2 w3", corrupted="w1 w4 w3", correct="Mary", incorrect="John")  # both <unk>
    with pytest.raises(pl.DatasetError, match=r"'Mary'.*'John'.*same token \(id 2"):
        pl.PromptPairDataset(pairs=[pair]).tokenize(tok)


@pytest.mark.parametrize("kwargs", [dict(layer=1.5), dict(layer=True), dict(layer=np.float64(2.0)),
                                    dict(layer=1, pos=1.0), dict(layer=1, pos=[2, 3.5]),
                                    dict(layer=1, pos=False)])
def test_non_integer_component_indices_are_type_errors(kwargs):
    with pytest.raises(TypeError, match="integer|named position"):
        pl.Component(site="resid_pre", **kwargs)
    with pytest.raises(TypeError):
        pl.Component(site="head", layer=1, head=0.0)


def test_integer_scalars_of_numpy_torch_and_xarray_are_indices():
    coord = xr.DataArray([3, 4], dims="layer")
    c = pl.Component(site="head", layer=coord[0], head=np.int64(1), pos=[torch.tensor(2), np.int32(0)])
    assert (c.layer, c.head, c.pos) == (3, 1, (0, 2)) and type(c.layer) is int


def test_non_integer_nodes_and_edges_are_type_errors():
    with pytest.raises(TypeError, match="integer"):
        Node(NodeKind.HEAD, 1.5, 0)
    with pytest.raises(TypeError, match="integer"):
        Node(NodeKind.MLP, True)
    with pytest.raises(ValueError, match="no layer"):
        Node(NodeKind.EMBED, 0)
    with pytest.raises(TypeError, match="integer"):
        Edge(Node(NodeKind.EMBED), Node(NodeKind.LOGITS), Channel.IN, pos=2.0)


@pytest.mark.parametrize("sweep", ["patch_layer_pos", "patch_heads"])
def test_non_integer_layers_are_type_errors(model, dataset, sweep):
    with pytest.raises(TypeError, match="integer"):
        getattr(pl, sweep)(model, dataset, layers=[1.7], progress=False)
    with pytest.raises(TypeError, match="integer"):
        getattr(pl, sweep)(model, dataset, layers=[True], progress=False)


def test_positions_by_name_resolve_through_the_dataset(model, dataset):
    by_name = pl.patch_layer_pos(model, dataset, layers=[1], positions=["A", "END"], progress=False)
    by_index = pl.patch_layer_pos(model, dataset, layers=[1], positions=[1, 5], progress=False)
    assert list(by_name.pos.values) == [1, 5] and list(by_name.pos_name.values) == ["A", "END"]
    np.testing.assert_array_equal(by_name.patched.values, by_index.patched.values)
    single = pl.patch_layer_pos(model, dataset, layers=1, positions="END", progress=False)
    assert list(single.pos.values) == [5] and list(single.layer.values) == [1]
    arrays = pl.patch_layer_pos(model, dataset, layers=np.arange(2), positions=torch.tensor([1, 5]), progress=False)
    assert list(arrays.layer.values) == [0, 1] and list(arrays.pos.values) == [1, 5]
    with pytest.raises(ValueError, match=r"'S2'.*not named positions.*'A': 1"):
        pl.patch_layer_pos(model, dataset, positions=["S2"], progress=False)
    with pytest.raises(TypeError, match="integer"):
        pl.patch_layer_pos(model, dataset, positions=[1.0], progress=False)


@pytest.mark.parametrize("components,match", [
    ({pl.Component(site="mlp_out", layer=0), pl.Component(site="mlp_out", layer=1)}, "sorted"),
    ([[pl.Component(site="mlp_out", layer=0), "L1.mlp_out"]], "jointly"),
    ([[]], "non-empty list"),
    (pl.Component(site="mlp_out", layer=0), "single"),
    ({"L0": pl.Component(site="mlp_out", layer=0)}, "list or tuple"),
    (["L0.mlp_out"], "must be a Component"),
    ([pl.Patch(pl.Component(site="mlp_out", layer=0))], "sweep_interventions"),
])
def test_patch_components_refuses_what_it_cannot_patch(model, dataset, components, match):
    with pytest.raises(TypeError, match=match):
        pl.patch_components(model, dataset, components, progress=False)


def test_patch_components_takes_a_tuple(model, dataset):
    comps = (pl.Component(site="mlp_out", layer=0), pl.Component(site="head", layer=1, head=2))
    ds = pl.patch_components(model, dataset, comps, progress=False)
    assert list(ds.component.values) == ["L0.mlp_out", "L1H2"]


def test_the_runner_refuses_components_the_model_does_not_have(model, dataset):
    tokens = dataset.tokenize(model.tokenizer)
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    common = dict(passes=[run_pair(tokens)], base="corrupted", source="clean", base_ids=tokens.corrupted_ids,
                  metric=Metric.LOGIT_DIFF, targets=targets, progress=False)
    for comp, match in [(pl.Component(site="mlp_out", layer=40), r"layer of L40.mlp_out.*0\.\.2"),
                        (pl.Component(site="k", layer=1, head=3), r"head of L1H3.k \(k\).*0\.\.1"),
                        (pl.Component(site="resid_pre", layer=1, pos=9),
                         r"L1.resid_pre@9.*position 9 is beyond corrupted prompt 0, which has 6 tokens "
                         r"\(indices 0\.\.5\)")]:
        with pytest.raises(ValueError, match=match):
            patch_rows(model, rows=[(comp,)], **common)


def test_path_patching_refuses_nodes_the_model_does_not_have(model, dataset):
    with pytest.raises(ValueError, match=r"L7(H|KV)0 is not a node of this model"):
        pl.path_patch_heads(model, dataset, receivers=[Node(NodeKind.HEAD, 7, 0)], progress=False)
    with pytest.raises(ValueError, match="L1H9 is not a node"):
        pl.path_patch_heads(model, dataset, receivers=[Node(NodeKind.HEAD, 1, 9)], channels=["q"], progress=False)


# ---- unknown options ------------------------------------------------------------------------------


@pytest.mark.parametrize("call,valid", [
    (lambda m, d: pl.patch_layer_pos(m, d, site="resid", progress=False), "'resid_pre'"),
    (lambda m, d: pl.patch_heads(m, d, site="z", progress=False), "'head'"),
    (lambda m, d: pl.patch_heads(m, d, direction="forward", progress=False), "'denoising', 'noising'"),
    (lambda m, d: pl.patch_heads(m, d, metric="logitdiff", progress=False), "'logit_diff', 'logprob', 'prob', 'kl'"),
    (lambda m, d: pl.patch_senders_into(m, d, Node(NodeKind.LOGITS), "input", progress=False), "'q', 'k', 'v', 'in'"),
    (lambda m, d: pl.evaluate_circuits(m, d, [], ablation="zero", progress=False), "'resample'"),
    (lambda m, d: pl.evaluate_circuits(m, d, [], level="head", progress=False), "'edge'"),
])
def test_unknown_options_list_the_valid_values(model, dataset, call, valid):
    with pytest.raises(ValueError, match="choose one of") as error:
        call(model, dataset)
    assert valid in str(error.value)


def test_options_are_case_insensitive_and_close_misspellings_are_named():
    assert pl.Site("RESID_PRE") is pl.Site.RESID_PRE and pl.Direction("Noising") is pl.Direction.NOISING
    with pytest.raises(ValueError, match="did you mean 'resid_pre'"):
        pl.Site("resid_pr")


@pytest.mark.parametrize("memory_mb", [float("nan"), 0, -5, "lots", float("inf"), True])
def test_bad_memory_budgets_are_refused(model, dataset, memory_mb):
    with pytest.raises(ValueError, match="memory_mb must be a finite number"):
        pl.patch_heads(model, dataset, memory_mb=memory_mb, progress=False)


# ---- a Hugging Face model where a PatchModel is expected ----------------------------------------------


@pytest.mark.parametrize("name", ["patch_layer_pos", "patch_heads", "path_patch_heads", "eap", "eap_ig",
                                  "exact_edge_scores", "acdc", "iterative_path_patching", "faithfulness_curve"])
def test_a_hugging_face_model_is_refused_with_the_fix(dataset, name):
    hf = tiny_model("llama")
    with pytest.raises(TypeError, match=r"pl\.load_model\(hf_model, tokenizer=tokenizer\)"):
        getattr(pl, name)(hf, dataset)
    with pytest.raises(TypeError, match="PatchModel"):
        pl.Graph.from_model(hf)
    with pytest.raises(TypeError, match="PatchModel"):
        pl.causal_trace("smollm2-135m", pl.builtin_facts())
