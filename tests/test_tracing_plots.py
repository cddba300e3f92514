"""Causal-trace figures show the Dataset's numbers, one panel per kind, labelled as in ROME."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import xarray as xr

from patchlab.tracing_plots import POSITION_LABELS, plot_causal_trace, plot_causal_trace_summary

KINDS = ["hidden", "mlp", "attn"]
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def trace_dataset() -> xr.Dataset:
    """Two prompts of lengths 5 and 3 (padded to 5), 4 layers, subjects at 1..2 and 0."""
    rng = np.random.default_rng(0)
    prob = rng.uniform(0.1, 0.9, size=(3, 2, 4, 5))
    prob[:, 1, :, 3:] = np.nan
    tokens = np.array([["The", " Eiffel", " Tower", " is", " in"], ["Paris", " is", " in", "", ""]])
    subject = np.zeros((2, 5), dtype=np.int8)
    subject[0, 1:3] = 1
    subject[1, 0] = 1
    return xr.Dataset(
        {"prob": (("kind", "prompt", "layer", "pos"), prob), "clean": ("prompt", [0.8, 0.7]),
         "corrupted": ("prompt", [0.1, 0.2]), "subject": (("prompt", "pos"), subject)},
        coords={"kind": KINDS, "prompt": [0, 1], "layer": np.arange(4), "pos": np.arange(5),
                "token": (("prompt", "pos"), tokens),
                "fact_prompt": ("prompt", ["The Eiffel Tower is in", "Paris is in"]),
                "answer": ("prompt", [" Paris", " France"])},
        attrs={"window": 3, "samples": 2, "noise_scale": 3.0})


def average_dataset() -> xr.Dataset:
    rng = np.random.default_rng(1)
    positions = list(POSITION_LABELS)
    return xr.Dataset(
        {"prob": (("kind", "layer", "position"), rng.uniform(size=(3, 4, len(positions)))),
         "clean": 0.8, "corrupted": 0.1},
        coords={"kind": KINDS, "layer": np.arange(4), "position": positions}, attrs={"window": 3})


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_one_panel_per_kind_with_its_colormap_and_values():
    ds = trace_dataset()
    fig = plot_causal_trace(ds, prompt=0)
    axes = image_axes(fig)
    assert len(axes) == 3
    for ax, kind in zip(axes, KINDS):
        (image,) = ax.images
        assert image.get_cmap().name == CMAPS[kind]
        # rows are tokens in prompt order, columns layers
        assert np.allclose(np.asarray(image.get_array()), ds.prob.sel(kind=kind, prompt=0).values.T)
    titles = [ax.get_title() for ax in axes]
    assert titles == ["restoring hidden state", "restoring MLP (window 3)", "restoring attention (window 3)"]
    assert all(ax.get_ylabel() == "p(answer)" for ax in fig.axes if not ax.images)  # colour bars
    suptitle = fig._suptitle.get_text()
    assert "Eiffel" in suptitle and "Paris" in suptitle and "0.800" in suptitle and "0.100" in suptitle


def test_subject_tokens_are_starred_in_prompt_order():
    fig = plot_causal_trace(trace_dataset(), prompt=0)
    ax = image_axes(fig)[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["The", " Eiffel*", " Tower*", " is", " in"]
    assert ax.yaxis_inverted()  # first token at the top


def test_padding_beyond_the_prompt_is_not_drawn():
    fig = plot_causal_trace(trace_dataset(), prompt=1)
    for ax in image_axes(fig):
        values = np.asarray(ax.images[0].get_array())
        assert values.shape == (3, 4)  # 3 tokens x 4 layers
        assert np.isfinite(values).all()
    labels = [t.get_text() for t in image_axes(fig)[0].get_yticklabels()]
    assert labels == ["Paris*", " is", " in"]


def test_prompt_out_of_range():
    with pytest.raises(IndexError):
        plot_causal_trace(trace_dataset(), prompt=2)


def test_summary_labels_positions_and_colour_bar():
    avg = average_dataset()
    fig = plot_causal_trace_summary(avg)
    axes = image_axes(fig)
    assert [ax.images[0].get_cmap().name for ax in axes] == ["Purples", "Greens", "Reds"]
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["first subject token", "middle subject tokens", "last subject token",
                      "first subsequent token", "further tokens", "last token"]
    assert np.allclose(np.asarray(axes[1].images[0].get_array()), avg.prob.sel(kind="mlp").values.T)
    assert all(ax.get_ylabel() == "average p(answer)" for ax in fig.axes if not ax.images)


def test_no_global_rc_change():
    before = dict(matplotlib.rcParams)
    plot_causal_trace(trace_dataset())
    plot_causal_trace_summary(average_dataset())
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()
