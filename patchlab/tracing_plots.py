"""Figures of causal traces, in the style of Meng et al. 2022 (ROME), Figure 1.

`plot_causal_trace` draws one prompt of a `causal_trace` result; `plot_causal_trace_summary`
draws an aligned average over prompts. Both take a Dataset and return a
`matplotlib.figure.Figure`; nothing is computed (beyond picking a prompt), shown, saved
or changed globally (styles apply inside ``with`` blocks only).

Conventions (as in the paper): one panel per restored ``kind`` side by side, hidden
states in ``Purples``, MLP in ``Greens``, attention in ``Reds``; x = ``layer``, y = token
(or aligned position), top to bottom in prompt order; subject tokens labelled with a
trailing ``*``. Each panel has its own colour scale from the corrupted p(answer) (the
baseline restoration improves upon; as in the ROME code) to the panel's largest value.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .plotting import _STYLE, _new_figure, _token_label

__all__ = ["plot_causal_trace", "plot_causal_trace_summary", "KIND_CMAPS", "POSITION_LABELS"]

KIND_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
"""Colormap per restored kind (ROME's colours)."""

POSITION_LABELS = {
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_subsequent": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}
"""y labels of the aligned ``position`` coord values of an averaged trace."""


def _kind_title(kind: str, window) -> str:
    if kind == "hidden":
        return "restoring hidden state"
    name = {"mlp": "MLP", "attn": "attention"}.get(kind, kind)
    return f"restoring {name}" + (f" (window {window})" if window is not None else "")


def _scale(values: np.ndarray, low: float) -> tuple[float, float]:
    """``[low, max]`` over the finite values, widened when that range is empty."""
    finite = values[np.isfinite(values)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = float(low) if np.isfinite(low) else (float(finite.min()) if finite.size else 0.0)
    if vmax <= vmin:
        vmin = min(vmin, float(finite.min()) if finite.size else vmin)
    if vmax <= vmin:
        vmax = vmin + 1e-6
    return vmin, vmax


def _panels(da: xr.DataArray, row_dim: str, ylabels: list[str], *, low: float, window,
            cbar_label: str, ylabel: str) -> Figure:
    """One ``(row_dim, layer)`` heatmap per ``kind`` of ``da`` (dims kind, layer, row_dim)."""
    kinds = [str(k) for k in da["kind"].values]
    n_rows, n_layers = da.sizes[row_dim], da.sizes["layer"]
    panel_w = min(max(3.0, 0.12 * n_layers + 2.2), 9.0)
    height = min(max(2.6, 0.3 * n_rows + 1.6), 12.0)
    fig, axes = _new_figure(panel_w * len(kinds), height, ncols=len(kinds))
    with plt.rc_context(_STYLE):
        for k, (ax, kind) in enumerate(zip(axes, kinds)):
            values = da.sel(kind=kind).transpose(row_dim, "layer").values.astype(float)
            _heatmap(ax, values, da["layer"].values, ylabels if k == 0 else None,
                     cmap=KIND_CMAPS.get(kind, "Greys"), scale=_scale(values, low), cbar_label=cbar_label)
            ax.set_title(_kind_title(kind, window))
            ax.set_ylabel(ylabel if k == 0 else "")
    return fig


def _heatmap(ax: Axes, values: np.ndarray, layers, ylabels: list[str] | None, *, cmap: str,
             scale: tuple[float, float], cbar_label: str) -> None:
    """Row 0 at the top (prompt order), columns are layers."""
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=scale[0], vmax=scale[1],
                      aspect="auto", interpolation="nearest", origin="upper")
    n_rows, n_layers = values.shape
    step = max(1, int(np.ceil(n_layers / 12)))
    ax.set_xticks(np.arange(0, n_layers, step), [str(int(v)) for v in np.asarray(layers)[::step]])
    ax.set_yticks(np.arange(n_rows), ylabels if ylabels is not None else [""] * n_rows)
    ax.set_xlabel("layer")
    ax.figure.colorbar(image, ax=ax, label=cbar_label)


def plot_causal_trace(ds: xr.Dataset, prompt: int = 0) -> Figure:
    """The causal trace of one prompt (Meng et al. 2022, Figure 1).

    Args:
        ds: a `causal_trace` result: ``prob`` (kind, prompt, layer, pos) with NaN beyond a
            prompt's length, ``clean`` / ``corrupted`` (prompt), ``subject`` (prompt, pos),
            coord ``token`` (prompt, pos); optional coords ``fact_prompt`` / ``answer``
            (prompt) and attr ``window``.
        prompt: the position along ``prompt`` (an index, not a label).

    Returns:
        The figure: one panel per kind, rows the prompt's real tokens (subject tokens
        with a trailing ``*``), columns layers, colour bar ``p(answer)``; the suptitle has
        the prompt, answer, and clean / corrupted p(answer).

    Raises:
        IndexError: ``prompt`` is out of range.
    """
    if not -ds.sizes["prompt"] <= prompt < ds.sizes["prompt"]:
        raise IndexError(f"prompt={prompt} out of range for {ds.sizes['prompt']} prompts")
    one = ds.isel(prompt=prompt)
    tokens = [str(t) for t in one["token"].values]
    # Real positions: a token is present (padding is ""), or a restored value is finite.
    real = np.array([t != "" for t in tokens]) | np.isfinite(one["prob"].values).any(axis=(0, 1))
    n = int(np.flatnonzero(real).max()) + 1 if real.any() else 0
    one = one.isel(pos=slice(0, n))
    subject = one["subject"].values.astype(bool) if "subject" in one else np.zeros(n, bool)
    ylabels = [_token_label(t) + ("*" if s else "") for t, s in zip(tokens[:n], subject)]
    clean, corrupted = float(one["clean"]), float(one["corrupted"])
    fig = _panels(one["prob"], "pos", ylabels, low=corrupted, window=ds.attrs.get("window"),
                  cbar_label="p(answer)", ylabel="token")
    text = str(one["fact_prompt"].values) if "fact_prompt" in one.coords else "".join(tokens[:n])
    answer = f" → {str(one['answer'].values)!r}" if "answer" in one.coords else ""
    with plt.rc_context(_STYLE):
        fig.suptitle(f"{_token_label(text)!r}{answer}\n"
                     f"p(answer): clean {clean:.3f}, corrupted {corrupted:.3f}")
    return fig


def plot_causal_trace_summary(avg: xr.Dataset) -> Figure:
    """Average causal traces over aligned positions (Meng et al. 2022, Figure 2).

    Args:
        avg: ``prob`` (kind, layer, position) with ``position`` values among
            `POSITION_LABELS` (other values are shown as they are), scalar ``clean`` /
            ``corrupted`` means (optional); attr ``window`` (optional).

    Returns:
        The figure: one panel per kind, rows the positions in the order of the coord,
        columns layers, colour bar ``average p(answer)``.
    """
    positions = [str(p) for p in avg["position"].values]
    ylabels = [POSITION_LABELS.get(p, p) for p in positions]
    corrupted = float(avg["corrupted"]) if "corrupted" in avg else np.nan
    fig = _panels(avg["prob"], "position", ylabels, low=corrupted, window=avg.attrs.get("window"),
                  cbar_label="average p(answer)", ylabel="")
    parts = [f"{v} {float(avg[v]):.3f}" for v in ("clean", "corrupted") if v in avg]
    with plt.rc_context(_STYLE):
        fig.suptitle("average causal trace" + (f"\np(answer): {', '.join(parts)}" if parts else ""))
    return fig
