"""Causal tracing against plain PyTorch hooks: noise added to the subject's block-0 input,
one clean state (block output, or MLP / attention outputs over a window) copied back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab as pl
from patchlab.facts import Fact, FactDataset
from patchlab.tracing import causal_trace, window_layers

from .precision import EXACT
from .tiny_models import tiny_patch_model

PATHS = {"gpt2": ("transformer.h", "mlp", "attn"), "llama": ("model.layers", "mlp", "self_attn")}


def test_window_is_centred_and_clipped():
    assert list(window_layers(5, 10, 30)) == list(range(0, 10))
    assert list(window_layers(15, 10, 30)) == list(range(10, 20))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(3, 1, 30)) == [3]


def reference_prob(hf, family, ids, span, answer, eps, kind, layer, pos, window, corrupted_ids=None):
    """p(answer) averaged over noise samples with one clean state restored, by hooks
    (or, with `corrupted_ids` and no noise, in the counterfactual prompt's run)."""
    blocks_path, mlp, attn = PATHS[family]
    blocks = hf.get_submodule(blocks_path)
    n = len(blocks)
    layers = [layer] if kind == "hidden" else list(window_layers(layer, window, n))
    modules = [blocks[i] if kind == "hidden" else getattr(blocks[i], mlp if kind == "mlp" else attn) for i in layers]
    first = lambda out: out[0] if isinstance(out, tuple) else out
    clean = {}
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: clean.__setitem__(i, first(out).detach().clone()))
               for i, m in enumerate(modules)]
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()

    def noise(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, span.start:span.stop] += eps.to(x.dtype)
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def restore(mod, a, out, i):
        value = first(out).clone()
        value[:, pos] = clean[i][:, pos]
        return (value,) + tuple(out[1:]) if isinstance(out, tuple) else value

    handles = [] if eps is None else [blocks[0].register_forward_pre_hook(noise, with_kwargs=True)]
    handles += [m.register_forward_hook(lambda mod, a, out, i=i: restore(mod, a, out, i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            logits = hf(ids.repeat(len(eps), 1) if eps is not None else corrupted_ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits.double(), -1)[:, answer].mean())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_restorations_equal_hooks(family):
    model = tiny_patch_model(family)
    hf = model.hf
    facts = FactDataset(facts=(Fact("w1 w2 w3 w4 w5 w6", "w2 w3", " w9"), Fact("w7 w8 w9 w10", "w10", " w3")))
    samples, noise, window, seed = 4, 3.0, 2, 5
    ds = causal_trace(model, facts, samples=samples, noise=noise, window=window, seed=seed, progress=False)
    tokens = facts.tokenize(model.tokenizer)
    for i in range(len(facts)):
        ids, span, answer = tokens.ids[i][None], tokens.subject_positions[i], int(tokens.answer_ids[i])
        eps = torch.randn(samples, len(span), hf.config.hidden_size,
                          generator=torch.Generator().manual_seed(seed + i)).double()
        eps = eps * (noise * ds.attrs["embedding_std"])
        for kind in ("hidden", "mlp", "attn"):
            for layer, pos in [(0, span.start), (1, span.stop - 1), (2, ids.shape[1] - 1)]:
                expected = reference_prob(hf, family, ids, span, answer, eps, kind, layer, pos, window)
                got = float(ds["prob"].sel(kind=kind, prompt=i, layer=layer, pos=pos))
                assert got == pytest.approx(expected, abs=EXACT), (kind, i, layer, pos)
        assert np.isnan(ds["prob"].sel(prompt=1).values[..., 4:]).all()  # beyond the shorter prompt
        assert ds["subject"].values[i, span.start:span.stop].all() and ds["subject"].values[i].sum() == len(span)


def test_symmetric_token_replacement_equals_hooks():
    model = tiny_patch_model("llama")
    hf = model.hf
    facts = FactDataset(facts=(Fact("w1 w2 w3 w4 w5", "w2 w3", " w9", counterfactual_subject="w20 w21"),))
    ds = causal_trace(model, facts, corruption="replace", window=2, progress=False)
    tokens = facts.tokenize(model.tokenizer)
    ids, span, answer = tokens.ids[0][None], tokens.subject_positions[0], int(tokens.answer_ids[0])
    other = FactDataset(facts=(Fact("w1 w20 w21 w4 w5", "w20 w21", " w9"),)).tokenize(model.tokenizer).ids[0][None]
    assert ds.attrs["corruption"] == "replace" and ds.attrs["samples"] == 1
    for kind in ("hidden", "mlp", "attn"):
        for layer, pos in [(0, 1), (1, 2), (2, 4)]:
            expected = reference_prob(hf, "llama", ids, span, answer, None, kind, layer, pos, 2, corrupted_ids=other)
            got = float(ds["prob"].sel(kind=kind, prompt=0, layer=layer, pos=pos))
            assert got == pytest.approx(expected, abs=EXACT)
    bad = FactDataset(facts=(Fact("w1 w2 w3 w4 w5", "w2 w3", " w9", counterfactual_subject="w20"),))
    with pytest.raises(ValueError, match="token positions"):
        causal_trace(model, bad, corruption="replace", progress=False)
    with pytest.raises(ValueError, match="no counterfactual_subject"):
        causal_trace(model, FactDataset(facts=(Fact("w1 w2 w3", "w2", " w4"),)), corruption="replace", progress=False)


def test_noising_corrupts_one_state_of_the_clean_run():
    model = tiny_patch_model("gpt2")
    hf = model.hf
    facts = FactDataset(facts=(Fact("w1 w2 w3 w4 w5", "w2 w3", " w9"),))
    samples, seed = 3, 2
    ds = causal_trace(model, facts, samples=samples, seed=seed, window=1, direction="noising", metric="logprob",
                      progress=False)
    assert ds.attrs["direction"] == "noising" and ds.attrs["metric"] == "logprob"
    tokens = facts.tokenize(model.tokenizer)
    ids, span, answer = tokens.ids[0][None], tokens.subject_positions[0], int(tokens.answer_ids[0])
    eps = torch.randn(samples, len(span), hf.config.hidden_size,
                      generator=torch.Generator().manual_seed(seed)).double() * (3.0 * ds.attrs["embedding_std"])
    blocks, noised = hf.transformer.h, {}

    def noise(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, span.start:span.stop] += eps
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handles = [blocks[0].register_forward_pre_hook(noise, with_kwargs=True),
               blocks[1].mlp.register_forward_hook(lambda m, a, out: noised.__setitem__("mlp", out.clone()))]
    with torch.no_grad():
        hf(ids.repeat(samples, 1))
    for h in handles:
        h.remove()

    def corrupt(m, a, out):
        out = out.clone()
        out[:, 3] = noised["mlp"][:, 3]
        return out

    handle = blocks[1].mlp.register_forward_hook(corrupt)
    try:
        with torch.no_grad():
            logits = hf(ids.repeat(samples, 1)).logits[:, -1]
    finally:
        handle.remove()
    expected = float(torch.log_softmax(logits.double(), -1)[:, answer].mean())
    assert float(ds["prob"].sel(kind="mlp", prompt=0, layer=1, pos=3)) == pytest.approx(expected, abs=EXACT)
    # The last block's output at the last token decides the output: noising it gives the corrupted run.
    last = float(ds["prob"].sel(kind="hidden", prompt=0, layer=2, pos=4))
    assert last == pytest.approx(float(ds["corrupted"][0]), abs=EXACT)
    with pytest.raises(ValueError, match="no incorrect answer"):
        causal_trace(model, facts, metric="logit_diff", progress=False)


def test_average_aligns_prompts_on_token_groups():
    model = tiny_patch_model("gpt2")
    facts = FactDataset(facts=(Fact("w1 w2 w3 w4 w5 w6 w7", "w2 w3 w4", " w9"), Fact("w7 w8 w9 w10", "w8", " w3")))
    ds = causal_trace(model, facts, samples=2, window=3, progress=False)
    p = ds["prob"].values  # [kind, prompt, layer, pos]; spans 1..3 of 7 tokens and 1..1 of 4 tokens
    expected = {"first_subject": (p[:, 0, :, 1] + p[:, 1, :, 1]) / 2, "middle_subject": p[:, 0, :, 2],
                "last_subject": (p[:, 0, :, 3] + p[:, 1, :, 1]) / 2, "first_subsequent": (p[:, 0, :, 4] + p[:, 1, :, 2]) / 2,
                "further": p[:, 0, :, 5], "last": (p[:, 0, :, 6] + p[:, 1, :, 3]) / 2}
    for name, value in expected.items():
        np.testing.assert_allclose(ds["average"].sel(position=name).values, value, rtol=1e-12, err_msg=name)


def test_embedding_std_is_over_subject_tokens():
    model = tiny_patch_model("llama")
    hf = model.hf
    facts = FactDataset(facts=(Fact("w1 w2 w3", "w2", " w4"),))
    ds = causal_trace(model, facts, samples=1, kinds=("hidden",), progress=False)
    ids = facts.tokenize(model.tokenizer).ids[0]
    expected = hf.get_input_embeddings()(ids[1:2]).std()  # Llama: block 0 reads the token embedding
    assert ds.attrs["embedding_std"] == pytest.approx(float(expected), rel=EXACT)
    with pytest.raises(ValueError, match="unknown kinds"):
        causal_trace(model, facts, kinds=("resid",))


def test_trace_round_trips_through_netcdf(tmp_path):
    import xarray as xr

    model = tiny_patch_model("gpt2")
    facts = FactDataset(facts=(Fact("w1 w2 w3 w4", "w2", " w9"), Fact("w5 w6 w7", "w6", " w3")))
    ds = causal_trace(model, facts, samples=2, window=2, progress=False)
    ds.to_netcdf(tmp_path / "trace.nc")
    with xr.open_dataset(tmp_path / "trace.nc") as back:
        xr.testing.assert_identical(back.load(), ds)
    assert ds.attrs["noise_scale"] == 3.0 and ds.attrs["samples"] == 2
    assert list(ds["token"].values[1][:3]) == ["w5", "w6", "w7"] and ds["subject"].values[1].tolist()[:3] == [0, 1, 0]


def test_interrupted_trace_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import xarray as xr

    from patchlab import tracing

    model = tiny_patch_model("gpt2")
    facts = FactDataset(facts=(Fact("w1 w2 w3 w4", "w2", " w9"), Fact("w5 w6 w7", "w6", " w3"),
                               Fact("w8 w9 w1 w2", "w9 w1", " w4")))
    kw = dict(samples=2, window=2, kinds=("hidden", "mlp"), progress=False)
    whole = causal_trace(model, facts, **kw)
    real, calls = tracing.trace_fact, []

    def flaky(*args, **kwargs):  # the third fact's request fails
        calls.append(args[1].tolist())
        if len(calls) == 3:
            raise pl.RemoteJobError("the remote job j failed on h: RuntimeError: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracing, "trace_fact", flaky)
    checkpoint = tmp_path / "trace.partial.nc"
    with pytest.raises(pl.RemoteJobError):
        causal_trace(model, facts, checkpoint=checkpoint, **kw)
    calls.clear()
    resumed = causal_trace(model, facts, checkpoint=checkpoint, **kw)
    assert len(calls) == 1  # only the unfinished fact ran again
    xr.testing.assert_identical(resumed.drop_attrs(), whole.drop_attrs())
    with pytest.raises(ValueError, match="other facts or settings"):
        causal_trace(model, facts, checkpoint=checkpoint, **{**kw, "samples": 3})
