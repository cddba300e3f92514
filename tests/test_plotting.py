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


# ---- conventions: orientation, labels, colour scale, titles, errors ---------------------------

import matplotlib as mpl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from patchlab.plotting import default_title  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def heatmap_cells(ax, shape):
    return np.ma.asarray(ax.collections[0].get_array()).reshape(shape)


def test_layer_zero_is_drawn_at_the_bottom():
    ax = pl.plot_layer_pos(layer_pos_dataset()).axes[0]
    ys = {t.get_text(): ax.transData.transform((0, y))[1]
          for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert list(ys) == ["0", "1", "2"]
    assert ys["0"] < ys["1"] < ys["2"]  # display y grows upwards


def test_position_labels_are_name_and_quoted_token_or_token():
    ax = pl.plot_layer_pos(layer_pos_dataset()).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["When", "IO\n' Mary'", " and", "END\n' to'"]


def test_control_characters_in_tokens_are_escaped():
    ds = layer_pos_dataset().assign_coords(token=("pos", ["a\nb", "\t", "c", "d"]),
                                           pos_name=("pos", ["", "", "", ""]))
    ax = pl.plot_layer_pos(ds).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["a\\nb", "\\t"]


def test_colour_scale_is_symmetric_blue_positive_and_score_spans_at_least_one():
    ds = layer_pos_dataset()
    ds["score"] = ds.score * 0 + np.linspace(-0.3, 0.6, 12).reshape(3, 4)
    mesh = pl.plot_layer_pos(ds).axes[0].collections[0]
    assert mesh.get_clim() == (-1.0, 1.0)  # |score| < 1: full recovery keeps its colour
    red, _, blue, _ = mesh.cmap(mesh.norm(0.9))
    assert blue > red
    red, _, blue, _ = mesh.cmap(mesh.norm(-0.9))
    assert red > blue
    assert np.allclose(mesh.cmap(mesh.norm(0.0))[:3], 0.97, atol=0.03)  # white-ish at 0
    mesh = pl.plot_layer_pos(ds, "patched").axes[0].collections[0]
    vmax = float(np.abs(ds.patched.mean("prompt")).max())
    assert np.allclose(mesh.get_clim(), (-vmax, vmax))


def test_nan_cells_stay_blank():
    ds = layer_pos_dataset()
    ds["score"][1, 2] = np.nan
    cells = heatmap_cells(pl.plot_layer_pos(ds).axes[0], (3, 4))
    assert cells.mask[1, 2] and cells.mask.sum() == 1
    assert np.allclose(cells.filled(0), np.nan_to_num(ds.score.values))


def test_colour_bar_labels_name_the_variable_and_units():
    ds = layer_pos_dataset()
    assert pl.plot_layer_pos(ds).axes[-1].get_ylabel() == "normalised score"
    assert pl.plot_layer_pos(ds, "patched").axes[-1].get_ylabel() == "logit_diff (nats)\nmean over 2 prompts"
    ds["score"].attrs.update(long_name="normalised patching score", units="1")  # as patching.py writes
    ds["patched"].attrs.update(long_name="patched logit_diff", units="nats")
    assert pl.plot_layer_pos(ds).axes[-1].get_ylabel() == "normalised patching score"
    assert pl.plot_layer_pos(ds, "patched").axes[-1].get_ylabel().startswith("patched logit_diff (nats)")


def test_titles_come_from_attrs_unless_given():
    ds = layer_pos_dataset()
    assert default_title(ds) == "resid_pre, denoising, logit_diff — ioi/name_swap\nm"
    assert pl.plot_layer_pos(ds).axes[0].get_title() == default_title(ds)
    assert pl.plot_layer_pos(ds, title="mine").axes[0].get_title() == "mine"
    assert default_title(xr.Dataset()) == ""


def test_drawing_into_a_given_axes_uses_its_figure():
    fig, (left, right) = plt.subplots(1, 2)
    out = pl.plot_layer_pos(layer_pos_dataset(), ax=right)
    assert out is fig and len(right.collections) == 1 and len(left.collections) == 0


def test_figure_width_grows_with_positions():
    small = pl.plot_layer_pos(layer_pos_dataset()).get_figwidth()
    wide = layer_pos_dataset().reindex(pos=np.arange(30), fill_value=0.0)
    wide = wide.assign_coords(token=("pos", [f"t{i}" for i in range(30)]), pos_name=("pos", [""] * 30))
    assert pl.plot_layer_pos(wide).get_figwidth() > small


def head_dataset(n_pos: int | None = None) -> xr.Dataset:
    rng = np.random.default_rng(1)
    dims, shape, coords = ("layer", "head"), (3, 5), {"layer": [0, 1, 2], "head": np.arange(5)}
    if n_pos:
        dims, shape = dims + ("pos",), shape + (n_pos,)
        coords.update(pos=np.arange(n_pos), token=("pos", [f"t{i}" for i in range(n_pos)]),
                      pos_name=("pos", ["", "S1", "", "END"][:n_pos]))
    return xr.Dataset({"score": (dims, rng.normal(size=shape))}, coords=coords,
                      attrs={"site": "head", "direction": "noising", "metric": "kl", "units": "nats"})


def test_layer_head_heatmap_cells_and_labels():
    ds = head_dataset()
    ax = pl.plot_layer_head(ds).axes[0]
    assert np.allclose(heatmap_cells(ax, (3, 5)), ds.score.values)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"] and not ax.yaxis_inverted()
    lo, hi = ax.collections[0].get_clim()
    assert lo == -hi and ax.get_title() == "head, noising, kl"
    # transposed storage draws the same picture
    ax = pl.plot_layer_head(ds.transpose("head", "layer")).axes[0]
    assert np.allclose(heatmap_cells(ax, (3, 5)), ds.score.values)


def test_layer_head_pos_sweep_draws_one_panel_per_named_position():
    ds = head_dataset(n_pos=4)
    fig = pl.plot_sweep(ds)
    panels = [ax for ax in fig.axes if ax.get_xlabel() == "head"]
    assert [ax.get_title() for ax in panels] == ["pos 1: S1 't1'", "pos 3: END 't3'"]
    for ax, i in zip(panels, (1, 3)):
        assert np.allclose(heatmap_cells(ax, (3, 5)), ds.score.isel(pos=i).values)
    clims = {ax.collections[0].get_clim() for ax in panels}
    assert len(clims) == 1  # one shared colour scale
    vmax = float(np.abs(ds.score.isel(pos=[1, 3])).max())
    assert np.allclose(clims.pop(), (-max(vmax, 1.0), max(vmax, 1.0)))
    unnamed = ds.assign_coords(pos_name=("pos", [""] * 4))
    assert len([ax for ax in pl.plot_sweep(unnamed).axes if ax.get_xlabel() == "head"]) == 4


def test_bad_inputs_raise():
    ds = layer_pos_dataset()
    with pytest.raises(KeyError, match="nope"):
        pl.plot_layer_pos(ds, "nope")
    with pytest.raises(KeyError):
        pl.plot_sweep(ds, "nope")
    with pytest.raises(ValueError, match="dims"):
        pl.plot_layer_head(ds)
    with pytest.raises(ValueError, match="dims"):
        pl.plot_sweep(ds.assign(clean=("prompt", [1.0, 2.0])), "clean")  # (prompt,) only
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="ax"):
        pl.plot_sweep(head_dataset(n_pos=4), ax=ax)


def test_plotting_changes_no_global_style():
    before = dict(mpl.rcParams)
    pl.plot_layer_pos(layer_pos_dataset())
    pl.plot_sweep(head_dataset(n_pos=4))
    assert dict(mpl.rcParams) == before


def test_path_graph_draws_the_strongest_paths_only():
    from patchlab.graph_plots import plot_channels, plot_path_graph

    score = np.zeros((2, 3))
    score[1, 2], score[0, 1] = 0.9, -0.3
    to_logits = xr.Dataset({"score": (("layer", "head"), score)}, coords={"layer": [0, 1], "head": [0, 1, 2]})
    qkv = np.full((3, 2, 3), np.nan)
    qkv[:, 0] = [[0.5, 0.0, 0.001], [0.0, 0.2, 0.0], [0.0, 0.0, 0.0]]
    to_receivers = xr.Dataset({"score": (("channel", "layer", "head"), qkv)},
                              coords={"channel": ["q", "k", "v"], "layer": [0, 1], "head": [0, 1, 2]},
                              attrs={"receivers": "L1H2"})
    fig = plot_path_graph(to_logits, to_receivers, top=2)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"logits", "L1H2", "L0H1", "L0H0"} <= labels and "L0H2" not in labels  # 0.001 is below the cut
    assert len(plot_channels(to_receivers).axes) >= 3
