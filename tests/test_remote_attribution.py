"""EAP and EAP-IG through nnsight's in-process remote simulation equal the local runs exactly.

``remote="local"`` serializes the session and the kernels (by value) and runs them with
the local modules hidden, so a kernel that reaches for patchlab or for ``model.hf`` fails
here. Correctness against the independent reference is `tests.test_attribution`'s job.
"""

from __future__ import annotations


import pytest
import torch
import xarray as xr

import patchlab as pl
from patchlab.attribution import eap, eap_ig

from .test_patching_exact import random_pairs
from .tiny_models import tiny_model, tiny_patch_model, tiny_tokenizer



@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def setup(request):
    model = tiny_patch_model(request.param)
    hf = model.hf
    return model, random_pairs(hf.config.vocab_size)


def assert_same_scores(local: xr.Dataset, remote: xr.Dataset) -> None:
    """Scores, coordinates and the baselines identical (other attrs hold times and versions)."""
    xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())
    for key in ("clean_mean", "corrupted_mean", "method", "metric", "direction"):
        assert local.attrs[key] == remote.attrs[key], key


def test_remote_eap_equals_local(setup):
    model, dataset = setup
    assert_same_scores(eap(model, dataset), eap(model, dataset, remote="local"))


def test_remote_eap_ig_equals_local(setup):
    model, dataset = setup
    local = eap_ig(model, dataset, steps=3, metric="kl", direction="denoising")
    remote = eap_ig(model, dataset, steps=3, metric="kl", direction="denoising", remote="local")
    assert_same_scores(local, remote)
    assert remote.attrs["ig_steps"] == 3


def test_remote_token_specific_eap_equals_local():
    hf = tiny_model("llama")  # grouped-query attention: k and v edges go to key/value heads
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=torch.float64,
                          model_id="tiny-llama")
    dataset = random_pairs(hf.config.vocab_size)
    assert_same_scores(eap(model, dataset, per_position=True), eap(model, dataset, per_position=True, remote="local"))
