"""Every sweep kind equals an independent plain-PyTorch forward-hook computation.

patchlab's sweeps (nnsight traces, batch expansion, vectorised writes, skipped
lower layers, final-position logits only) are compared, value by value, with
`tests.reference`, which patches one component per forward pass with plain
``register_forward_hook`` calls, on tiny random models of every family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab as pl
from patchlab.components import Site
from patchlab.metrics import Metric, Targets

from .reference import RefPatch, reference_cache, reference_patched_logits
from .precision import exact_atol
from .tiny_models import FAMILIES, tiny_patch_model

ALL_FAMILIES = tuple(FAMILIES) + ("gpt_neox_seq",)
N_PROMPTS, N_POS = 3, 6


def random_pairs(vocab: int, seed: int = 0) -> pl.PromptPairDataset:
    """Random clean prompts; corrupted = clean with two positions resampled."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(N_PROMPTS):
        clean = torch.randint(5, vocab - 3, (N_POS,), generator=g)
        corrupted = clean.clone()
        corrupted[[1, 3]] = torch.randint(5, vocab - 3, (2,), generator=g)
        a, b = torch.randint(5, vocab - 3, (2,), generator=g).tolist()
        pairs.append(pl.PromptPair(clean=" ".join(f"w{i}" for i in clean.tolist()),
                                   corrupted=" ".join(f"w{i}" for i in corrupted.tolist()),
                                   correct=f"w{a}", incorrect=f"w{b}", positions={"A": 1, "END": N_POS - 1}))
    return pl.PromptPairDataset(pairs=pairs, name="random", corruption="resample")


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request):
    model = tiny_patch_model(request.param)
    dataset = random_pairs(model.hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    return model, dataset, tokens


def reference_values(model, tokens, components, direction: str, metric=Metric.LOGIT_DIFF) -> torch.Tensor:
    """Metric per (component, prompt), one plain-hook forward pass per component."""
    hf = model.hf
    sites = sorted({(c.site.value, c.layer) for c in components})
    clean = reference_cache(hf, tokens.clean_ids, sites)
    corrupted = reference_cache(hf, tokens.corrupted_ids, sites)
    base_ids, source = (tokens.corrupted_ids, clean) if direction == "denoising" else (tokens.clean_ids, corrupted)
    with torch.no_grad():
        clean_logits = hf(tokens.clean_ids).logits[:, -1]
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids,
                      clean_logprobs=torch.log_softmax(clean_logits, -1))
    out = []
    for c in components:
        patch = RefPatch(site=c.site.value, layer=c.layer, head=c.head, pos=c.pos,
                         value=source[(c.site.value, c.layer)])
        out.append(metric(reference_patched_logits(hf, base_ids, [patch]), targets))
    return torch.stack(out)


def resid_sites(model):
    sites = [Site.RESID_PRE, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT]
    return sites + ([Site.RESID_MID] if model.adapter.has_resid_mid(model.hf.config) else [])


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_layer_pos_sweeps_equal_reference(setup, direction):
    model, dataset, tokens = setup
    for site in resid_sites(model):
        ds = pl.patch_layer_pos(model, dataset, site=site, direction=direction, progress=False)
        comps = [pl.Component(site=site, layer=int(layer), pos=int(p)) for layer in ds.layer for p in ds.pos]
        expected = reference_values(model, tokens, comps, direction)
        got = torch.from_numpy(ds.patched.values).reshape(len(comps), -1)
        tol = exact_atol(model, expected)
        assert torch.allclose(got, expected, atol=tol, rtol=0), (site, (got - expected).abs().max())


@pytest.mark.parametrize("site", ["head", "q", "k", "v"])
def test_head_sweeps_equal_reference(setup, site):
    model, dataset, tokens = setup
    ds = pl.patch_heads(model, dataset, site=site, progress=False)
    assert ds.sizes["head"] == model.layout.n_heads_at(Site(site))
    comps = [pl.Component(site=site, layer=int(layer), head=int(h)) for layer in ds.layer for h in ds["head"]]
    expected = reference_values(model, tokens, comps, "denoising")
    got = torch.from_numpy(ds.patched.values).reshape(len(comps), -1)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("site", ["head", "k"])
def test_head_per_position_sweeps_equal_reference(setup, site):
    model, dataset, tokens = setup
    ds = pl.patch_heads(model, dataset, site=site, per_position=True, direction="noising", progress=False)
    comps = [pl.Component(site=site, layer=int(layer), head=int(h), pos=int(p))
             for layer in ds.layer for h in ds["head"] for p in ds.pos]
    expected = reference_values(model, tokens, comps, "noising")
    got = torch.from_numpy(ds.patched.values).reshape(len(comps), -1)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), (got - expected).abs().max()


def test_component_list_with_position_sets(setup):
    model, dataset, tokens = setup
    last = model.layout.n_layers - 1
    comps = [pl.Component(site="resid_pre", layer=1, pos=[1, 3]), pl.Component(site="q", layer=last, head=1, pos=[2, 5]),
             pl.Component(site="mlp_out", layer=0), pl.Component(site="head", layer=0, head=0, pos=N_POS - 1)]
    for metric in Metric:
        ds = pl.patch_components(model, dataset, comps, metric=metric, progress=False)
        expected = reference_values(model, tokens, comps, "denoising", metric=metric)
        assert list(ds.component.values) == [c.label for c in comps]
        tol = exact_atol(model, expected)
        assert torch.allclose(torch.from_numpy(ds.patched.values), expected, atol=tol, rtol=0), metric


def test_baselines_and_score_closed_form(setup):
    model, dataset, tokens = setup
    ds = pl.patch_layer_pos(model, dataset, site="resid_pre", layers=[0], progress=False)
    with torch.no_grad():
        clean = model.hf(tokens.clean_ids).logits[:, -1]
        corrupted = model.hf(tokens.corrupted_ids).logits[:, -1]
    ld = lambda lg: (lg.gather(1, tokens.correct_ids[:, None]) - lg.gather(1, tokens.incorrect_ids[:, None]))[:, 0]
    assert torch.allclose(torch.from_numpy(ds.clean.values), ld(clean).double(), atol=exact_atol(model, clean))
    assert torch.allclose(torch.from_numpy(ds.corrupted.values), ld(corrupted), atol=exact_atol(model, corrupted))
    # Patching the whole clean residual stream at layer 0 position by position: the
    # positions that differ (1, 3) are the only ones with an effect.
    unchanged = ds.patched.sel(layer=0, pos=[0, 2, 4]).values
    assert abs(unchanged - ds.corrupted.values).max() < exact_atol(model, clean)
    m = ds.patched.mean("prompt")
    expected = (m - ds.corrupted.mean()) / (ds.clean.mean() - ds.corrupted.mean())
    assert abs(ds.score - expected).max() < 1e-9


def test_chunking_and_reruns(setup):
    model, dataset, _ = setup
    a = pl.patch_heads(model, dataset, site="v", per_position=True, progress=False)
    b = pl.patch_heads(model, dataset, site="v", per_position=True, progress=False)
    one_row_per_pass = pl.patch_heads(model, dataset, site="v", per_position=True, progress=False, memory_mb=1e-9)
    assert np.array_equal(a.patched.values, b.patched.values)  # reruns on CPU are bit-identical
    tol = exact_atol(model, torch.from_numpy(a.patched.values))
    assert np.allclose(a.patched.values, one_row_per_pass.patched.values, atol=tol, rtol=0)
