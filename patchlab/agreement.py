"""Comparing edge scores: attribution against exact patching, and any method against a known circuit.

`agreement` reports how far two score sets for the same edges agree: Spearman rank
correlation (of the signed scores and of ``|score|``), the overlap of their top-k
edges, and the edges where they disagree most, each tagged with the AtP* failure
mode it looks like (Kramar et al. 2024, arXiv 2403.00745): ``"sign"`` (opposite
signs: direct and indirect effects cancelling), ``"under"`` (attribution far
below exact: saturated attention or a flat nonlinearity), ``"over"`` (attribution
far above exact: a large activation where the first-order estimate breaks).

`roc_auc` scores a ranking against a ground-truth edge set (Conmy et al. 2023 use
it to compare discovery methods with hand-found circuits).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from .graph import Edge

__all__ = ["agreement", "roc_auc"]


def agreement(estimate: xr.Dataset, exact: xr.Dataset, *, top_k: Sequence[int] = (10, 50, 100),
              n_disagreements: int = 20) -> xr.Dataset:
    """How well `estimate` (e.g. EAP) agrees with `exact` edge scores on their common edges.

    Args:
        estimate, exact: edge scores (`patchlab.circuit.edge_scores`), same metric and direction.
        top_k: sizes for the top-k overlap (by ``|score|``); sizes above the number of
            common edges are dropped.
        n_disagreements: how many of the most different edges to list.

    Returns:
        Dataset with ``top_k_overlap`` (k) = |top-k(estimate) & top-k(exact)| / k;
        ``estimate``, ``exact`` and ``failure_mode`` (disagreement), the edges with the
        largest ``|estimate - exact|`` (metric units); attrs ``spearman``,
        ``spearman_abs``, ``n_edges``, the two methods and units.

    Raises:
        ValueError: no common edges, or scores in different units or directions.
    """
    for attr in ("units", "direction", "metric"):
        a, b = estimate.attrs.get(attr), exact.attrs.get(attr)
        if a is not None and b is not None and a != b:
            raise ValueError(f"the two score sets differ in {attr} ({a!r} vs {b!r}); compare like with like")
    common = np.intersect1d(estimate["edge"].values, exact["edge"].values)
    if common.size == 0:
        raise ValueError("the two score sets share no edge")
    a = estimate["score"].sel(edge=common).values.astype(np.float64)
    b = exact["score"].sel(edge=common).values.astype(np.float64)
    ks = [int(k) for k in top_k if 0 < k <= common.size]
    order_a, order_b = np.argsort(-np.abs(a), kind="stable"), np.argsort(-np.abs(b), kind="stable")
    overlap = [len(set(order_a[:k]) & set(order_b[:k])) / k for k in ks]
    worst = np.argsort(-np.abs(a - b), kind="stable")[:n_disagreements]
    ds = xr.Dataset({
        "top_k_overlap": ("k", np.asarray(overlap, dtype=np.float64), {"units": "1"}),
        "estimate": ("disagreement", a[worst], {"units": str(estimate.attrs.get("units", ""))}),
        "exact": ("disagreement", b[worst], {"units": str(exact.attrs.get("units", ""))}),
        "failure_mode": ("disagreement", np.asarray([_mode(a[i], b[i]) for i in worst], dtype=str)),
    }, coords={"k": np.asarray(ks, dtype=np.int64), "edge": ("disagreement", common[worst].astype(str))})
    ds.attrs = {"spearman": _spearman(a, b), "spearman_abs": _spearman(np.abs(a), np.abs(b)),
                "n_edges": int(common.size), "estimate_method": str(estimate.attrs.get("method", "")),
                "exact_method": str(exact.attrs.get("method", "")), "units": str(exact.attrs.get("units", "")),
                "failure_modes": "sign: opposite signs; under: |estimate| < |exact|/2; over: |estimate| > 2|exact|"}
    return ds


def roc_auc(scores: xr.Dataset, positives: Iterable[Edge]) -> float:
    """Area under the ROC curve of the ranking by ``|score|`` against a ground-truth edge set:
    the probability that a random true edge outranks a random other edge (ties count one half).

    Raises:
        ValueError: a true edge that is not scored, or no negatives.
    """
    labels = scores["edge"].values.astype(str)
    truth = {e.label for e in positives}
    missing = truth - set(labels)
    if missing or not truth or len(truth) == labels.size:
        raise ValueError(f"ROC AUC needs true edges that are all scored and some that are not true "
                         f"(unscored: {sorted(missing)[:3]})")
    is_true = np.isin(labels, list(truth))
    ranks = pd.Series(np.abs(scores["score"].values)).rank(method="average").values
    n_pos, n_neg = is_true.sum(), (~is_true).sum()
    return float((ranks[is_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return float("nan")
    ra, rb = (pd.Series(x).rank(method="average").values for x in (a, b))  # Spearman = Pearson of ranks
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _mode(estimate: float, exact: float) -> str:
    if np.sign(estimate) != np.sign(exact) and min(abs(estimate), abs(exact)) > 0:
        return "sign"
    if abs(estimate) < abs(exact) / 2:
        return "under"
    if abs(estimate) > 2 * abs(exact):
        return "over"
    return "close"
