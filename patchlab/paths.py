"""Path patching sweeps (Wang et al. 2022, arXiv 2211.00593), as labelled ``xarray.Dataset`` results.

Path patching measures a sender's effect on a receiver along the direct path
only: other heads are frozen, so the effect cannot travel through them (MLPs are
recomputed unless ``freeze_mlps``). See `patchlab.path_runner` for the steps.
It differs from edge patching (`patchlab.edges`), which lets the patched
receiver's change flow on through the rest of the model.

The default direction is **noising** as in the paper: the clean run, with the
senders' corrupted outputs along the path (use the "abc" IOI corruption for
Wang et al.'s setting); the score ``(m_clean - m_patched) / (m_clean - m_corrupted)``
is then the fraction of the clean behaviour the path carries.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import xarray as xr

from .data import PromptPairDataset
from .graph import Channel, Node, NodeKind
from .metrics import Direction, Metric, get_metric
from .models import PatchModel, takes_model
from .patching import pair_targets, result_dataset, run_pair, tokenize_for
from .path_runner import cache_path_runs, path_patch_rows

__all__ = ["path_patch_heads", "path_caches"]


def path_caches(model: PatchModel, dataset: PromptPairDataset) -> dict:
    """The clean and corrupted runs' activations that path patching reads, computed here
    (one forward pass), to pass as ``caches=`` to several `path_patch_heads` sweeps of
    `dataset`. Local models only: remotely every sweep computes its own in its request."""
    return cache_path_runs(model, [run_pair(tokenize_for(model, dataset, paired="path patching"))])


@takes_model
def path_patch_heads(model: PatchModel, dataset: PromptPairDataset, *,
                     receivers: str | Sequence[Node] = "logits", channels: Iterable[str | Channel] = ("q", "k", "v"),
                     via: Sequence[tuple[Node, str | Channel]] = (), freeze_mlps: bool = False, metric: Metric | str = Metric.LOGIT_DIFF,
                     direction: Direction | str = Direction.NOISING, seed: int | None = None,
                     progress: bool = True, memory_mb: float = 1024, caches: dict | None = None,
                     remote=None) -> xr.Dataset:
    """Path patching from every head (one sender per row) to a set of receivers.

    Args:
        receivers: ``"logits"`` (direct effect on the output), or a set of query-head
            nodes (e.g. the name movers) whose q, k or v input receives the paths.
            On grouped-query models, k and v paths go to the key/value head of
            each receiver's group (shared by the group's query heads).
        channels: with head receivers, the input channels to sweep, each one a
            separate receiver set (all receivers' q, then all their k, ...).
        via: an intermediate hop for multi-hop paths, sender -> via -> receivers:
            (head node, channel) pairs, e.g. the S-inhibition heads' q; k/v on
            grouped-query models take key/value-head nodes. The hop's inputs are
            recorded with the senders patched, then patched in with only the hop's
            heads live and every other head frozen.
        freeze_mlps: freeze MLPs to their base run's values too (default: recompute).
        metric, direction, seed: as in `patchlab.patch_layer_pos`.
        caches: `path_caches` of `dataset`, to share among sweeps run here;
            None: computed within the call.
        remote: see `patchlab.remote`; this costs 1 request (the caches, every
            pass and the metric together).

    Returns:
        Dataset with ``patched`` ([channel,] layer, head, prompt) and ``score``
        ([channel,] layer, head): the sender head is (layer, head); senders at or
        after the first receiver's layer have no path and are NaN. Attrs
        ``receivers`` (labels), ``freeze_mlps``, and the usual provenance.

    Raises:
        ValueError: an empty or unknown receiver set or channel.
    """
    lay = model.layout
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(f"receivers must be 'logits' or a list of head nodes, got {receivers!r}")
        sets, labels, channel_dim = {"in": [(Node(NodeKind.LOGITS), Channel.IN)]}, "logits", False
    else:
        receivers = list(receivers)
        if not receivers or any(n.kind is not NodeKind.HEAD for n in receivers):
            raise ValueError("receivers must be a non-empty list of query-head nodes, e.g. Node(NodeKind.HEAD, 9, 6)")
        group = lay.n_heads // lay.n_kv_heads
        kv = NodeKind.KV_HEAD if lay.n_kv_heads != lay.n_heads else NodeKind.HEAD
        sets = {}
        for channel in map(Channel, channels):
            if channel is Channel.IN:
                raise ValueError("head receivers have channels q, k and v")
            sets[channel.value] = list(dict.fromkeys(
                (n if channel is Channel.Q else Node(kv, n.layer, n.head // group), channel) for n in receivers))
        labels, channel_dim = ",".join(n.label for n in receivers), True
    via = [(node, Channel(channel)) for node, channel in via]
    first = min((n.layer if n.kind is not NodeKind.LOGITS else lay.n_layers)
                for n, _ in via or [r for rs in sets.values() for r in rs])
    senders = [Node(NodeKind.HEAD, layer, h) for layer in range(min(first, lay.n_layers)) for h in range(lay.n_heads)]

    tokens = tokenize_for(model, dataset, paired="path patching")
    metric, direction = get_metric(metric), Direction(direction)
    base, source = ("corrupted", "clean") if direction is Direction.DENOISING else ("clean", "corrupted")
    grid = torch.full((len(sets), lay.n_layers, lay.n_heads, tokens.n_prompts), float("nan"), dtype=torch.float64)
    result = path_patch_rows(model, passes=[run_pair(tokens)], base=base, source=source,
                             base_ids=tokens.corrupted_ids if base == "corrupted" else tokens.clean_ids,
                             rows=[(s,) for s in senders], receiver_sets=list(sets.values()), metric=metric,
                             targets=pair_targets(tokens), hops=[via] if via else [], freeze_mlps=freeze_mlps,
                             memory_mb=memory_mb, progress=progress, acts=caches, remote=remote,
                             gap=("clean", "corrupted"))
    grid[:, :first] = result.values.reshape(len(sets), first, lay.n_heads, -1)
    dims, coords = ("layer", "head"), {"layer": list(range(lay.n_layers)), "head": list(range(lay.n_heads))}
    patched = grid if channel_dim else grid[0]
    if channel_dim:
        dims, coords = ("channel",) + dims, {"channel": np.asarray(list(sets), dtype=str), **coords}
    baselines = {"metric": metric, "direction": direction, **result.runs}
    return result_dataset(model, dataset, tokens, baselines, patched, dims, coords, "path", seed,
                          receivers=labels, via=",".join(f"{n.label}.{c.value}" for n, c in via),
                          freeze_mlps=int(freeze_mlps), method="path patching (Wang et al. 2022)",
                          nan_values="senders at or after the first receiver's layer: no path to patch")
