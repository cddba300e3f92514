"""`pl.mean_difference` against means of each prompt run alone (no padding) with plain forward
hooks (tests/reference.py), float64, on every family."""

import pytest
import torch

import patchlab as pl
from tests.precision import exact_atol
from tests.reference import reference_cache
from tests.test_real_prompts import loaded, mixed_pairs, own
from tests.tiny_models import FAMILIES

SITES = ("resid_pre", "attn_out", "mlp_out")


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_difference_equals_the_means_of_each_prompt_alone(family):
    model, dataset, tokens, alone = loaded(family, mixed_pairs)
    positions = ["X", "END", -1, 0]
    layers = list(range(model.layout.n_layers))
    for site in SITES:
        got = pl.mean_difference(model, dataset, site=site, positions=positions)
        caches = {run: [reference_cache(model.hf, ids, [(site, layer) for layer in layers]) for ids in seqs]
                  for run, seqs in alone.items()}
        for run, var in (("clean", "clean_mean"), ("corrupted", "corrupted_mean")):
            want = torch.stack([torch.stack([torch.stack([caches[run][p][(site, layer)][0, own(tokens, run, p, pos)]
                                                          for pos in positions])
                                             for p in range(len(dataset))]).mean(0) for layer in layers])
            # padded batch against prompts alone: float32 softmax families get float32 precision (tests/precision.py)
            torch.testing.assert_close(torch.from_numpy(got[var].values), want.double(), rtol=0,
                                       atol=exact_atol(model, want, padded=True))
        torch.testing.assert_close(got["direction"].values, got["clean_mean"].values - got["corrupted_mean"].values,
                                   rtol=0, atol=0)
        assert got["direction"].dims == ("layer", "pos", "d_model")
        assert list(got["pos"].values) == ["X", "END", "-1", "0"]


def test_mean_difference_defaults_to_every_named_position_and_refuses_bad_input():
    model, dataset, _, _ = loaded("llama", mixed_pairs)
    got = pl.mean_difference(model, dataset, layers=[1])
    assert list(got["pos"].values) == ["END", "X"] and list(got["layer"].values) == [1]
    assert float(got["norm"].sel(pos="X", layer=1)) > 0
    with pytest.raises(ValueError, match="mean_difference takes one of"):
        pl.mean_difference(model, dataset, site="head")
    with pytest.raises(ValueError, match="not a named position"):
        pl.mean_difference(model, dataset, positions=["nowhere"])
    with pytest.raises(ValueError, match="out of range"):
        pl.mean_difference(model, dataset, layers=[99])
