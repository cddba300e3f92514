"""Figures show the numbers of the Dataset they are given, labelled with its tokens."""

from __future__ import annotations

import numpy as np
import xarray as xr

import patchlab as pl


def layer_pos_dataset() -> xr.Dataset:
    rng = np.random.default_rng(0)
    score = rng.normal(size=(3, 4))
    return xr.Dataset(
        {"score": (("layer", "pos"), score), "patched": (("layer", "pos", "prompt"), rng.normal(size=(3, 4, 2)))},
        coords={"layer": [0, 1, 2], "pos": [0, 1, 2, 3], "prompt": [0, 1],
                "token": ("pos", ["When", " Mary", " and", " to"]), "pos_name": ("pos", ["", "IO", "", "END"])},
        attrs={"site": "resid_pre", "direction": "denoising", "metric": "logit_diff", "units": "nats",
               "corruption": "name_swap", "dataset": "ioi", "model_id": "m"})


def test_layer_pos_heatmap_cells_and_labels():
    ds = layer_pos_dataset()
    fig = pl.plot_layer_pos(ds)
    ax = fig.axes[0]
    cells = np.asarray(ax.collections[0].get_array()).reshape(3, 4)
    assert np.allclose(cells, ds.score.values)  # row i of the mesh is layer i (drawn bottom-up)
    assert not ax.yaxis_inverted()  # layer 0 at the bottom
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "When" in labels[0] and "Mary" in labels[1] and "IO" in labels[1] and "END" in labels[3]
    lo, hi = ax.collections[0].get_clim()
    assert np.isclose(lo, -hi)


def test_plot_sweep_dispatches_on_dims_and_averages_prompts():
    ds = layer_pos_dataset()
    fig = pl.plot_sweep(ds, "patched")
    cells = np.asarray(fig.axes[0].collections[0].get_array()).reshape(3, 4)
    assert np.allclose(cells, ds.patched.mean("prompt").values)
    heads = ds.rename(pos="head").drop_vars(["token", "pos_name"])
    fig = pl.plot_sweep(heads)
    assert fig.axes[0].get_xlabel() == "head"
