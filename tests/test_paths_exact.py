"""Path patching equals the independent plain-hook reference (`tests.reference_graph`) on every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchlab.graph import Node, NodeKind
from patchlab.metrics import Metric, Targets
from patchlab.paths import path_patch_heads

from .reference_graph import reference_path_patched_logits
from .precision import exact_atol
from .test_patching_exact import ALL_FAMILIES, random_pairs
from .tiny_models import tiny_patch_model


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request):
    model = tiny_patch_model(request.param)
    hf = model.hf
    dataset = random_pairs(hf.config.vocab_size)
    return model, dataset, dataset.tokenize(model.tokenizer)


def reference(model, tokens, sender, receivers, freeze_mlps=False):
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    logits = reference_path_patched_logits(model.hf, tokens.clean_ids, tokens.corrupted_ids, [sender], receivers,
                                           freeze_mlps=freeze_mlps)
    return Metric.LOGIT_DIFF(logits, targets).double()


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_every_head_to_logits(setup, freeze_mlps):
    model, dataset, tokens = setup
    ds = path_patch_heads(model, dataset, freeze_mlps=freeze_mlps, progress=False)
    assert ds.patched.dims == ("layer", "head", "prompt") and ds.attrs["freeze_mlps"] == int(freeze_mlps)
    for layer in range(model.layout.n_layers):
        for head in range(model.layout.n_heads):
            expected = reference(model, tokens, ("head", layer, head), "logits", freeze_mlps)
            got = torch.from_numpy(ds.patched.sel(layer=layer, head=head).values)
            assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), \
                (layer, head, (got - expected).abs().max())


def test_every_head_to_a_receiver_sets_qkv(setup):
    model, dataset, tokens = setup
    lay = model.layout
    group = lay.n_heads // lay.n_kv_heads
    receivers = [Node(NodeKind.HEAD, 2, 1), Node(NodeKind.HEAD, 2, 3)]
    ds = path_patch_heads(model, dataset, receivers=receivers, progress=False)
    assert list(ds.channel.values) == ["q", "k", "v"] and ds.attrs["receivers"] == "L2H1,L2H3"
    assert np.isnan(ds.patched.sel(layer=2).values).all()  # no path from the receivers' own layer
    for channel in ("q", "k", "v"):
        heads = [1, 3] if channel == "q" else sorted({1 // group, 3 // group})
        ref_receivers = [(("head", 2, h), channel) for h in heads]
        for layer in range(2):
            for head in range(lay.n_heads):
                expected = reference(model, tokens, ("head", layer, head), ref_receivers)
                got = torch.from_numpy(ds.patched.sel(channel=channel, layer=layer, head=head).values)
                assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), (channel, layer, head)


def test_bad_receivers_are_refused(setup):
    model, dataset, _ = setup
    with pytest.raises(ValueError, match="receivers"):
        path_patch_heads(model, dataset, receivers="resid", progress=False)
    with pytest.raises(ValueError, match="channels q, k and v"):
        path_patch_heads(model, dataset, receivers=[Node(NodeKind.HEAD, 1, 0)], channels=["in"], progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("channel", ["q", "v"])
def test_multihop_sender_via_a_head_to_logits(family, channel):
    from .reference_graph import reference_multihop_path_patched_logits

    model = tiny_patch_model(family)
    hf = model.hf
    dataset = random_pairs(hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    kv = NodeKind.KV_HEAD if model.layout.n_kv_heads != model.layout.n_heads else NodeKind.HEAD
    via_node = Node(NodeKind.HEAD, 1, 2) if channel == "q" else Node(kv, 1, 1)
    ds = path_patch_heads(model, dataset, via=[(via_node, channel)], progress=False)
    assert ds.attrs["via"] == f"{via_node.label}.{channel}"
    assert np.isnan(ds.patched.sel(layer=[1, 2]).values).all()
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    for head in range(model.layout.n_heads):
        logits = reference_multihop_path_patched_logits(
            hf, tokens.clean_ids, tokens.corrupted_ids, [("head", 0, head)],
            [[(("head", 1, via_node.head), channel)]], "logits")
        expected = Metric.LOGIT_DIFF(logits, targets).double()
        got = torch.from_numpy(ds.patched.sel(layer=0, head=head).values)
        tol = exact_atol(model, expected)
        assert torch.allclose(got, expected, atol=tol, rtol=0), (head, (got - expected).abs().max())
