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
from .metrics import Direction, Metric
from .models import PatchModel
from .patching import prepare_runs, result_dataset, tokenize_for
from .path_runner import path_cache_sites, path_patch_rows

__all__ = ["path_patch_heads"]


def path_patch_heads(model: PatchModel, dataset: PromptPairDataset, *,
                     receivers: str | Sequence[Node] = "logits", channels: Iterable[str | Channel] = ("q", "k", "v"),
                     via: Sequence[tuple[Node, str | Channel]] = (), freeze_mlps: bool = False, metric: Metric | str = Metric.LOGIT_DIFF,
                     direction: Direction | str = Direction.NOISING, seed: int | None = None,
                     progress: bool = True, memory_mb: float = 1024) -> xr.Dataset:
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
        freeze_mlps: freeze MLPs to their clean values too (default: recompute).
        metric, direction, seed: as in `patchlab.patch_layer_pos`.

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

    tokens = tokenize_for(model, dataset)
    runs = prepare_runs(model, tokens, path_cache_sites(model), metric, direction)
    grid = torch.full((len(sets), lay.n_layers, lay.n_heads, tokens.n_prompts), float("nan"))
    values = path_patch_rows(model, base_ids=runs.base_ids, base=runs.base, source=runs.source,
                             rows=[(s,) for s in senders], receiver_sets=list(sets.values()),
                             metric=runs.metric, targets=runs.targets,
                             hops=[via] if via else [], freeze_mlps=freeze_mlps, memory_mb=memory_mb,
                             progress=progress)
    grid[:, :first] = values.reshape(len(sets), first, lay.n_heads, -1)
    dims, coords = ("layer", "head"), {"layer": list(range(lay.n_layers)), "head": list(range(lay.n_heads))}
    patched = grid if channel_dim else grid[0]
    if channel_dim:
        dims, coords = ("channel",) + dims, {"channel": np.asarray(list(sets), dtype=str), **coords}
    return result_dataset(model, dataset, tokens, runs.baselines, patched, dims, coords, "path", seed,
                          receivers=labels, via=",".join(f"{n.label}.{c.value}" for n, c in via),
                          freeze_mlps=int(freeze_mlps), method="path patching (Wang et al. 2022)")
