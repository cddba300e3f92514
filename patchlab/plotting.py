"""Figures of patching sweeps. Nothing is computed here beyond a mean over prompts.

Every function takes a result `xarray.Dataset` (dims ``layer``, ``pos``,
``head``, ``prompt``; coords ``token`` and ``pos_name`` along ``pos``; attrs
``metric``, ``units``, ``direction``, ``site``, ``corruption``, ``model_id``)
and returns a `matplotlib.figure.Figure`. Nothing is shown, saved, or changed
globally: styles apply inside ``with`` blocks only.

Conventions shared by all heatmaps:

- rows are layers with **layer 0 at the bottom** (the residual stream flows
  upwards, as in most residual-stream figures);
- a diverging ``RdBu`` colormap centred at 0 with a symmetric scale
  ``[-vmax, vmax]``: **blue is positive**, red negative, white zero. For the
  normalised ``score``, ``vmax`` is at least 1 so that full recovery is always
  the same deep blue; for other variables it is the largest absolute value;
- a variable that still has a ``prompt`` dim is averaged over prompts (NaN
  ignored), and the colour-bar label says so.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_layer_pos", "plot_layer_head", "plot_sweep", "default_title"]


_CMAP = "RdBu"
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9}


def default_title(ds: xr.Dataset) -> str:
    """Title from attrs: ``"resid_pre, denoising, logit_diff — ioi/name_swap"``.

    The part after the dash joins the ``dataset`` and ``corruption`` attrs that are
    present; ``model_id``, when present, goes on a second line.
    """
    a = ds.attrs
    head = ", ".join(str(a[k]) for k in ("site", "direction", "metric") if a.get(k) not in (None, ""))
    tail = "/".join(str(a[k]) for k in ("dataset", "corruption") if a.get(k) not in (None, ""))
    title = " — ".join(p for p in (head, tail) if p)
    if a.get("model_id"):
        title += f"\n{a['model_id']}"
    return title


def _token_label(token: str) -> str:
    """A token made printable on one line (newlines and tabs escaped)."""
    return str(token).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _pos_labels(ds: xr.Dataset | xr.DataArray) -> list[str]:
    """Column labels along ``pos``: ``"IO\\n' Mary'"`` for named positions, else the token."""
    n = ds.sizes["pos"]
    tokens = ds["token"].values if "token" in ds.coords else ds["pos"].values
    names = ds["pos_name"].values if "pos_name" in ds.coords else [""] * n
    labels = []
    for tok, name in zip(tokens, names):
        tok = _token_label(tok)
        labels.append(f"{name}\n'{tok}'" if name else tok)
    return labels


def _colorbar_label(ds: xr.Dataset, var: str, n_prompts: int | None) -> str:
    """``"normalised score"``, ``"logit_diff (nats)"``, ... plus the prompt mean, if any."""
    attrs = ds[var].attrs
    metric, units = ds.attrs.get("metric", ""), ds.attrs.get("units", "")
    if attrs.get("long_name"):
        units_ = str(attrs.get("units", ""))  # CF: "1" means dimensionless, shown without units
        label = str(attrs["long_name"]) + (f" ({units_})" if units_ not in ("", "1") else "")
    elif var == "score":
        label = "normalised score"
    elif var in ("patched", "clean", "corrupted") and metric:
        label = ("" if var == "patched" else f"{var} ") + metric + (f" ({units})" if units else "")
    else:
        label = var
    if n_prompts is not None:
        label += f"\nmean over {n_prompts} prompts"
    return label


def _select(ds: xr.Dataset, var: str, dims: tuple[str, ...]) -> tuple[xr.DataArray, int | None]:
    """``ds[var]`` averaged over ``prompt`` and transposed to ``dims``.

    Raises:
        KeyError: ``var`` is not a data variable.
        ValueError: the remaining dims are not exactly ``dims``.
    """
    if var not in ds.data_vars:
        raise KeyError(f"no data variable {var!r}; have {sorted(map(str, ds.data_vars))}")
    da = ds[var]
    n_prompts = None
    if "prompt" in da.dims:
        n_prompts = da.sizes["prompt"]
        da = da.mean("prompt", skipna=True, keep_attrs=True)
    if set(da.dims) != set(dims):
        raise ValueError(f"{var!r} has dims {da.dims} (after averaging over prompt); "
                         f"this plot needs exactly {dims}")
    return da.transpose(*dims), n_prompts


def _vmax(values: np.ndarray, var: str) -> float:
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size else 0.0
    if var == "score":
        vmax = max(vmax, 1.0)
    return vmax if vmax > 0 else 1.0


def _heatmap(ax: Axes, da: xr.DataArray, *, xlabels: list[str], xlabel: str, vmax: float,
             cbar: bool, cbar_label: str, rotate: bool) -> None:
    """Draw a (layer, x) DataArray with layer 0 at the bottom."""
    # vmin = -vmax centres the diverging map at 0; seaborn's center= would rebuild the
    # colormap (and trips a matplotlib deprecation), so it is not used.
    sns.heatmap(da.values.astype(float), ax=ax, cmap=_CMAP, vmin=-vmax, vmax=vmax,
                xticklabels=xlabels, yticklabels=[str(v) for v in da["layer"].values],
                cbar=cbar, cbar_kws={"label": cbar_label} if cbar else None,
                linewidths=0.0, square=False)
    ax.invert_yaxis()  # seaborn draws row 0 at the top; put layer 0 at the bottom
    ax.set_ylabel("layer")
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", rotation=0)
    if rotate:
        ax.tick_params(axis="x", rotation=60)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    else:
        ax.tick_params(axis="x", rotation=0)


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    with sns.axes_style("white"), plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False,
                                 layout="constrained")
    return fig, list(axes[0])


def _size(n_cols: int, n_layers: int, *, col_in: float, extra_h: float) -> tuple[float, float]:
    width = min(max(4.0, col_in * n_cols + 2.2), 30.0)
    height = min(max(3.0, 0.28 * n_layers + 1.4 + extra_h), 20.0)
    return width, height


def plot_layer_pos(ds: xr.Dataset, var: str = "score", *, title: str | None = None,
                   ax: Axes | None = None) -> Figure:
    """Heatmap of a ``(layer, pos)`` variable, e.g. residual-stream patching.

    Args:
        ds: a sweep result; ``ds[var]`` has dims ``(layer, pos)`` or
            ``(layer, pos, prompt)`` (then averaged over ``prompt``).
        var: the data variable, e.g. ``"score"`` (dimensionless) or
            ``"patched"`` (the metric's units).
        title: the axes title; default `default_title`.
        ax: draw into this axes (its figure is returned); default a new figure
            sized to the number of positions and layers.

    Returns:
        The figure. Rows are layers (layer 0 at the bottom), columns positions
        labelled ``"pos_name\\n'token'"`` or the token.

    Raises:
        KeyError: ``var`` is missing. ValueError: wrong dims.
    """
    da, n_prompts = _select(ds, var, ("layer", "pos"))
    labels = _pos_labels(ds)
    any_named = any("\n" in label for label in labels)
    if ax is None:
        fig, (ax,) = _new_figure(*_size(da.sizes["pos"], da.sizes["layer"], col_in=0.55,
                                        extra_h=0.9 if any_named else 0.5))
    with plt.rc_context(_STYLE):
        _heatmap(ax, da, xlabels=labels, xlabel="position", vmax=_vmax(da.values, var),
                 cbar=True, cbar_label=_colorbar_label(ds, var, n_prompts), rotate=True)
        ax.set_title(default_title(ds) if title is None else title)
    return ax.figure


def plot_layer_head(ds: xr.Dataset, var: str = "score", *, title: str | None = None,
                    ax: Axes | None = None) -> Figure:
    """Heatmap of a ``(layer, head)`` variable, e.g. head-output patching.

    Same conventions and errors as `plot_layer_pos`; columns are head indices.
    ``ds[var]`` has dims ``(layer, head)`` or ``(layer, head, prompt)``.
    """
    da, n_prompts = _select(ds, var, ("layer", "head"))
    if ax is None:
        fig, (ax,) = _new_figure(*_size(da.sizes["head"], da.sizes["layer"], col_in=0.38,
                                        extra_h=0.3))
    with plt.rc_context(_STYLE):
        _heatmap(ax, da, xlabels=[str(h) for h in da["head"].values], xlabel="head",
                 vmax=_vmax(da.values, var), cbar=True,
                 cbar_label=_colorbar_label(ds, var, n_prompts), rotate=False)
        ax.set_title(default_title(ds) if title is None else title)
    return ax.figure


def _plot_layer_head_per_pos(ds: xr.Dataset, var: str, *, title: str | None) -> Figure:
    """One layer x head panel per position (named positions only, if any are named)."""
    da_all, n_prompts = _select(ds, var, ("layer", "head", "pos"))
    names = ds["pos_name"].values if "pos_name" in ds.coords else [""] * ds.sizes["pos"]
    keep = [i for i, n in enumerate(names) if n] or list(range(ds.sizes["pos"]))
    labels = [_pos_labels(ds)[i].replace("\n", " ") for i in keep]
    vmax = _vmax(da_all.isel(pos=keep).values, var)
    ncols = len(keep)
    _, height = _size(da_all.sizes["head"], da_all.sizes["layer"], col_in=0.3, extra_h=0.6)
    panel = max(2.5, 0.26 * da_all.sizes["head"] + 0.7)
    fig, axes = _new_figure(min(panel * ncols + 1.2, 40.0), height, ncols=ncols)
    with plt.rc_context(_STYLE):
        for k, (ax, i, label) in enumerate(zip(axes, keep, labels)):
            last = k == ncols - 1
            _heatmap(ax, da_all.isel(pos=i), xlabels=[str(h) for h in da_all["head"].values],
                     xlabel="head", vmax=vmax, cbar=last,
                     cbar_label=_colorbar_label(ds, var, n_prompts), rotate=False)
            ax.set_title(f"pos {ds['pos'].values[i]}: {label}")
            if k:
                ax.set_ylabel("")
        fig.suptitle(default_title(ds) if title is None else title)
    return fig


def _check_drawable(ds: xr.Dataset, var: str) -> None:
    """Refuse values that only a broken normalisation makes: infinities, and NaN scores where the
    patched metric is finite (NaN where nothing was patched, e.g. heads after a path's
    receivers, stays blank)."""
    values = ds[var].values
    if np.isinf(values).any():
        raise ValueError(f"{var} has infinite values: the clean and corrupted means are (almost) equal, so "
                         "normalised scores divide by ~0; recompute it with this patchlab (which refuses such "
                         "datasets with BaselineGapError) on prompts whose corruption changes the behaviour")
    if var == "score" and "patched" in ds.data_vars:
        patched = ds["patched"].mean("prompt") if "prompt" in ds["patched"].dims else ds["patched"]
        if (np.isnan(values) & np.isfinite(patched.values)).any():
            raise ValueError("score is NaN where the patched metric is finite: the clean and corrupted means are "
                             "equal, so there is no gap to normalise by; plot var='patched' or recompute on "
                             "prompts whose corruption changes the behaviour")


def plot_sweep(ds: xr.Dataset, var: str = "score", **kw) -> Figure:
    """Pick the plot for the dims of ``ds[var]`` (ignoring ``prompt``, which is averaged).

    - ``(layer, pos)``: `plot_layer_pos`;
    - ``(layer, head)``: `plot_layer_head`;
    - ``(layer, head, pos)``: one layer x head panel per position, sharing one
      symmetric colour scale; only the named positions (non-empty ``pos_name``)
      are drawn when any are named, since averaging over positions would dilute
      the few positions that matter. ``ax=`` is not accepted for this layout.

    Keyword arguments (``title``, ``ax``) are passed on.

    Raises:
        KeyError: ``var`` is missing. ValueError: other dims, ``ax`` with the
            per-position layout, or values a zero clean-corrupted gap made (infinite
            values; NaN scores where the patched metric is finite).
    """
    if var not in ds.data_vars:
        raise KeyError(f"no data variable {var!r}; have {sorted(map(str, ds.data_vars))}")
    _check_drawable(ds, var)
    dims = set(ds[var].dims) - {"prompt"}
    if dims == {"layer", "pos"}:
        return plot_layer_pos(ds, var, **kw)
    if dims == {"layer", "head"}:
        return plot_layer_head(ds, var, **kw)
    if dims == {"layer", "head", "pos"}:
        if kw.get("ax") is not None:
            raise ValueError("a (layer, head, pos) sweep is drawn as several panels; drop ax=")
        return _plot_layer_head_per_pos(ds, var, title=kw.get("title"))
    raise ValueError(f"no plot for dims {tuple(ds[var].dims)}; supported: (layer, pos), "
                     "(layer, head), (layer, head, pos), each optionally with prompt")
