"""Runner for path patching (Wang et al. 2022, "Interpretability in the Wild", arXiv 2211.00593).

For each row's sender set, two forward passes over the batch (one row per
sender set):

1. the base input, with every sender set to its source value (a head's output
   z, an MLP's output), every other head's output frozen to its base value and
   MLPs recomputed (or frozen too, ``freeze_mlps``); the receivers' inputs are
   recorded: the q/k/v projection slice of each receiver head (key/value head for
   k and v on grouped-query models), the residual stream an MLP reads, or the
   final residual stream for the logits;
2. the base input with only those recorded receiver inputs patched in; the
   metric is read from its final position.

The base and source caches are computed once per sweep. Blocks below the first
sender (pass 1) and below the first receiver (pass 2) are skipped, fed the base
run's cached residual stream; blocks after the last receiver are skipped in pass 1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from .components import Site
from .graph import Channel, Node, NodeKind
from .metrics import Metric, Targets
from .models import PatchModel
from .runner import RunCache, chunk_rows, rows_per_chunk, skip_value

__all__ = ["path_cache_sites", "path_patch_rows"]

LOGITS = (Node(NodeKind.LOGITS), Channel.IN)


def path_cache_sites(model: PatchModel) -> set[tuple[Site, int]]:
    """The (site, layer) activations the base and source caches need."""
    return {(s, layer) for layer in range(model.layout.n_layers) for s in (Site.RESID_PRE, Site.HEAD, Site.MLP_OUT)}


def path_patch_rows(model: PatchModel, *, base_ids: torch.Tensor, base: RunCache, source: RunCache,
                    rows: Sequence[Sequence[Node]], receiver_sets: Sequence[Sequence[tuple[Node, Channel]]],
                    metric: Metric, targets: Targets, hops: Sequence[Sequence[tuple[Node, Channel]]] = (),
                    freeze_mlps: bool = False, memory_mb: float = 1024, progress: bool = True) -> torch.Tensor:
    """Metric of the base run after path patching each row's senders into each receiver set.

    Pass 1 does not depend on the receivers, so it runs once per chunk of rows and
    records the inputs of every receiver of every set; pass 2 runs once per set.

    Args:
        rows: one set of sender nodes (heads and/or MLPs) per row.
        receiver_sets: sets of (node, channel) pairs: head q (query heads), k/v
            (key/value heads on grouped-query models), MLP "in", or the logits.
        hops: intermediate receiver sets for multi-hop paths (sender -> hop 1 ->
            ... -> receivers), head q/k/v channels only: each hop's inputs are
            recorded with the previous hop's inputs patched in and only the
            previous hop's heads live, every other head frozen.
        freeze_mlps: freeze MLPs to their base values too (a variant; default
            recomputes them, as in the paper).

    Returns:
        Metric values, ``[set, row, prompt]``.

    Raises:
        ValueError: a sender that is not a head or MLP, or a receiver that does not
            come after every sender.
    """
    receiver_sets = [list(dict.fromkeys(rs)) for rs in receiver_sets]
    hops = [list(dict.fromkeys(h)) for h in hops]
    receivers = list(dict.fromkeys(r for rs in receiver_sets for r in rs))
    stages = hops + [receivers]
    for before, after in zip(stages, stages[1:]):
        if any(c.site is None for _, c in before) or \
                max(n.layer for n, _ in before) >= min(_layer(model, n) for n, _ in after):
            raise ValueError("each hop must be head q/k/v inputs in layers before every receiver of the next stage")
    first_receiver = min(_layer(model, node) for node, _ in stages[0])
    for row in rows:
        for s in row:
            if s.kind not in (NodeKind.HEAD, NodeKind.MLP):
                raise ValueError(f"path patching senders are heads or MLPs, got {s.label}")
            late = [n.label for n, _ in stages[0] if _layer(model, n) < s.layer or
                    (_layer(model, n) == s.layer and not (n.kind is NodeKind.MLP and s.kind is NodeKind.HEAD
                                                         and model.adapter.has_resid_mid(model.hf.config)))]
            if late:
                raise ValueError(f"receivers {late} do not come after sender {s.label}: "
                                 "receivers must read the residual stream after every sender writes to it")
    n_prompts, n_pos = base_ids.shape
    limit = rows_per_chunk(model, n_prompts, n_pos, memory_mb)
    starts = [min((s.layer for s in row), default=first_receiver) for row in rows]
    out = torch.empty(len(receiver_sets), len(rows), n_prompts)
    for chunk in tqdm(chunk_rows(starts, limit), desc="path patching", unit="pass", disable=not progress, leave=False):
        chunk_rows_ = [rows[r] for r in chunk]
        recorded = _record(model, base_ids, base, source, chunk_rows_, starts[chunk[0]], stages[0], freeze_mlps)
        for stage in stages[1:]:
            recorded = _record(model, base_ids, base, source, [()] * len(chunk), min(n.layer for n, _ in recorded),
                               stage, freeze_mlps, previous=recorded)
        for i, receiver_set in enumerate(receiver_sets):
            first = min(_layer(model, node) for node, _ in receiver_set)
            logits = _replay(model, base_ids, base, {k: recorded[k] for k in receiver_set}, len(chunk), first)
            out[i, chunk] = metric(logits, targets.repeat(len(chunk))).reshape(len(chunk), n_prompts).cpu()
    return out


def _layer(model: PatchModel, node: Node) -> int:
    return model.layout.n_layers if node.kind is NodeKind.LOGITS else node.layer


def _receivers_at(model, receivers):
    heads, mlps = defaultdict(list), set()
    for node, channel in receivers:
        if channel.site is not None:
            heads[node.layer].append((node, channel))
        elif node.kind is NodeKind.MLP:
            mlps.add(node.layer)
    return heads, mlps


def _record(model: PatchModel, base_ids, base: RunCache, source: RunCache, rows, start: int,
            receivers, freeze_mlps: bool, previous: dict | None = None) -> dict:
    """One recording pass; returns the receivers' inputs.

    Hop 1 (``previous`` None): the rows' senders at their source values. Later hops:
    the previous hop's recorded inputs patched in, and the previous hop's heads
    computing their outputs from them. Every other head is frozen to its base value.
    """
    adapter, layout, nn = model.adapter, model.layout, model.nn
    n_rows, n_layers = len(rows), layout.n_layers
    rep = lambda t: t.repeat(n_rows, *([1] * (t.dim() - 1))).to(model.device)
    expand = lambda m: m.repeat_interleave(base_ids.shape[0], dim=0).to(model.device)
    head_mask = torch.zeros(n_rows, n_layers, layout.n_heads, dtype=torch.bool)
    mlp_mask = torch.zeros(n_rows, n_layers, dtype=torch.bool)
    for r, row in enumerate(rows):
        for s in row:
            if s.kind is NodeKind.HEAD:
                head_mask[r, s.layer, s.head] = True
            else:
                mlp_mask[r, s.layer] = True
    head_mask, mlp_mask = expand(head_mask), expand(mlp_mask)
    live = torch.zeros(n_layers, layout.n_heads, dtype=torch.bool)  # heads of the previous hop
    group = layout.n_heads // layout.n_kv_heads
    for node, channel in previous or {}:
        if channel is Channel.Q or node.kind is NodeKind.HEAD:
            live[node.layer, node.head] = True
        else:
            live[node.layer, node.head * group:(node.head + 1) * group] = True
    patch_at, _ = _receivers_at(model, list(previous or {}))
    heads_at, mlps_at = _receivers_at(model, receivers)
    last = max(_layer(model, n) for n, _ in receivers)
    skip_to = skip_value(model, base, start, n_rows)
    ids = base_ids.repeat(n_rows, 1).to(model.device)
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1):
        store = nnsight.save({})
        for layer in range(start):
            adapter.block(nn, layer).skip(skip_to)
        for layer in range(start, min(last + 1, n_layers)):
            by_point = defaultdict(lambda: ([], []))
            for node, channel in patch_at[layer]:
                by_point[adapter.point(channel.site, layer)][0].append((node, channel))
            for node, channel in heads_at[layer]:
                by_point[adapter.point(channel.site, layer)][1].append((node, channel))
            for point in sorted(by_point, key=lambda p: p.sort_key):
                module = adapter.module(nn, point)
                patches, reads = by_point[point]
                raw = _patched(adapter, layout, module.output, patches, previous) if patches else module.output
                if patches:
                    module.output = raw
                for node, channel in reads:
                    store[(node, channel)] = adapter.view(channel.site, raw, layout)[:, :, node.head].clone()
            o_proj = adapter.module(nn, adapter.point(Site.HEAD, layer))
            z_base = rep(base.acts[(Site.HEAD, layer)])
            if live[layer].any():
                z_base = torch.where(live[layer, None, None, :, None].to(model.device),
                                     adapter.view(Site.HEAD, o_proj.input, layout), z_base)
            frozen = torch.where(head_mask[:, layer, None, :, None], rep(source.acts[(Site.HEAD, layer)]), z_base)
            o_proj.input = frozen.reshape(o_proj.input.shape)
            if layer in mlps_at:
                store[(Node(NodeKind.MLP, layer), Channel.IN)] = adapter.module(nn, adapter.mlp_in_point(layer)).input.clone()
            if freeze_mlps or mlp_mask[:, layer].any():
                mlp = adapter.module(nn, adapter.point(Site.MLP_OUT, layer))
                other = rep(base.acts[(Site.MLP_OUT, layer)]) if freeze_mlps else mlp.output
                mlp.output = torch.where(mlp_mask[:, layer, None, None], rep(source.acts[(Site.MLP_OUT, layer)]), other)
        tail = skip_value(model, base, last + 1, n_rows) if last + 1 < n_layers else None
        for layer in range(last + 1, n_layers):
            adapter.block(nn, layer).skip(tail)  # nothing after the last receiver is read
        if last >= n_layers:
            store[LOGITS] = adapter.final_norm_module(nn).input.clone()
    return store


def _patched(adapter, layout, raw, receivers, recorded):
    """`raw` projection output with each receiver head's slice replaced by its recorded input."""
    new = raw
    for node, channel in receivers:
        site = channel.site
        view = adapter.view(site, new, layout).clone()
        view[:, :, node.head] = recorded[(node, channel)]
        new = adapter.unview(site, new, view, layout)
    return new


def _replay(model: PatchModel, base_ids, base: RunCache, recorded: dict, n_rows: int, first: int) -> torch.Tensor:
    """Pass 2: the base run with only the recorded receiver inputs patched in."""
    adapter, layout, nn = model.adapter, model.layout, model.nn
    heads_at, mlps_at = _receivers_at(model, list(recorded))
    start = min(first, layout.n_layers)
    ids = base_ids.repeat(n_rows, 1).to(model.device)
    skip_to = skip_value(model, base, min(start, layout.n_layers - 1), n_rows) if start else None
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1):
        for layer in range(min(start, layout.n_layers)):
            adapter.block(nn, layer).skip(skip_to)
        for layer in range(start, layout.n_layers):
            by_point = defaultdict(list)
            for node, channel in heads_at[layer]:
                by_point[adapter.point(channel.site, layer)].append((node, channel))
            for point in sorted(by_point, key=lambda p: p.sort_key):
                module = adapter.module(nn, point)
                module.output = _patched(adapter, layout, module.output, by_point[point], recorded)
            if layer in mlps_at:
                adapter.module(nn, adapter.mlp_in_point(layer)).input = recorded[(Node(NodeKind.MLP, layer), Channel.IN)]
        if LOGITS in recorded:
            adapter.final_norm_module(nn).input = recorded[LOGITS]
        logits = nnsight.save(nn.output.logits[:, -1])
    return logits
