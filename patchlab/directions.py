"""Difference-in-means directions: `mean_difference`.

The refusal direction of Arditi et al. 2024 ("Refusal in Language Models Is Mediated by a Single
Direction", arXiv 2406.11717; METHODS.md) is the difference between the mean residual stream of
harmful and of harmless prompts, at one layer and one post-instruction position:

    r[layer, pos] = mean_{harmful i} x_i[layer, pos] - mean_{harmless j} x_j[layer, pos]

`mean_difference` computes it for every layer and position of a sweep in one program (one request
remotely), reading each prompt at its own index of each named position, so prompts of any lengths
(left-padded) give the same means as each prompt run alone. The directions are used with
`patchlab.ProjectOut` (directional ablation) and `patchlab.Steer` (activation addition).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import xarray as xr

from .components import Site
from .data import PromptPairDataset
from .kernels import directions as kdirections
from .models import PatchModel, takes_model
from .patching import run_pair, tokenize_for
from .provenance import provenance_attrs
from .remote import execute
from .runner import check_range, pass_specs

__all__ = ["mean_difference"]

_SITES = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT)


@takes_model
def mean_difference(model: PatchModel, dataset: PromptPairDataset, *, site: Site | str = Site.RESID_PRE,
                    layers: Iterable[int] | None = None, positions: Iterable[int | str] | None = None,
                    remote=None) -> xr.Dataset:
    """Mean activation of the clean prompts minus that of the corrupted prompts, per layer and position.

    Args:
        dataset: clean prompts (e.g. harmful instructions, `patchlab.chat_pairs`) against corrupted
            ones (harmless); the pairing does not matter, only the two sets.
        site: a d_model-wide site: ``resid_pre`` (default, as Arditi et al.), ``resid_mid``,
            ``resid_post``, ``attn_out`` or ``mlp_out``.
        layers: the layers (default: all).
        positions: names (``"post_instruction_0"``), indices or offsets from the end (``-1``),
            resolved in each prompt's own tokens (default: every name of the dataset).
        remote: run on a hosted model (NDIF); one request.

    Returns:
        Dataset over ``layer``, ``pos``, ``d_model``: ``direction`` (the difference, in the
        activation's own units), ``clean_mean`` and ``corrupted_mean`` (the two means), ``norm``
        (layer, pos: the direction's L2 norm); float64; attrs: provenance, ``site``,
        ``n_clean``, ``n_corrupted``.

    Raises:
        ValueError: a per-head site, a layer out of range, a position some prompt lacks.
        patchlab.data.DatasetError: the dataset does not tokenize consistently.
    """
    site = Site(site)
    if site not in _SITES:
        raise ValueError(f"mean_difference takes one of {[s.value for s in _SITES]}, got {site.value!r}")
    tokens = tokenize_for(model, dataset)
    layers = check_range("layer", None if layers is None else list(layers), model.layout.n_layers)
    run_positions = tokens.run_positions()
    if positions is None:
        positions = sorted(run_positions["clean"].names, key=_natural) or [-1]
    positions = list(positions)
    if not positions:
        raise ValueError("mean_difference needs at least one position")
    columns = {run: np.stack([run_positions[run].columns(p, f"position {p!r}", run).numpy() for p in positions], 1)
               for run in ("clean", "corrupted")}
    reads = [{"run": run, "site": site.value, "layer": layer, "columns": torch.from_numpy(columns[run])}
             for layer in layers for run in ("clean", "corrupted")]
    spec = {"arch": model.arch(), "runs": pass_specs([run_pair(tokens)], {(site, layer) for layer in layers}),
            "reads": reads}
    means = execute(model, kdirections.position_means_program, spec, remote=remote)
    stacked = np.stack([m.cpu().numpy() for m in means]).reshape(len(layers), 2, len(positions), -1)
    clean, corrupted = stacked[:, 0], stacked[:, 1]
    direction = clean - corrupted
    dims = ("layer", "pos", "d_model")
    return xr.Dataset(
        {"direction": (dims, direction, {"long_name": "mean clean minus mean corrupted activation"}),
         "clean_mean": (dims, clean), "corrupted_mean": (dims, corrupted),
         "norm": (("layer", "pos"), np.linalg.norm(direction, axis=-1), {"long_name": "L2 norm of the direction"})},
        coords={"layer": layers, "pos": [str(p) for p in positions]},
        attrs=provenance_attrs(model_id=model.model_id, model_sha256=model.weights_sha256,
                               dataset_sha256=dataset.sha256(), seed=None, site=site.value, n_clean=len(dataset),
                               n_corrupted=len(dataset), method="difference in means (Arditi et al. 2024)"))


def _natural(name: str):
    """``last_instruction`` before ``post_instruction_0 .. _10`` in numeric order."""
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
