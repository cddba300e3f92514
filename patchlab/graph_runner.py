"""Runner for graph-level patching: exact, batched edge patching in nnsight traces.

Edge patching (Conmy et al. 2023; auto-circuit's convention): in the patched
forward pass, a receiver channel with patched incoming edges reads

    x_{r,c} = x_r + sum over its patched edges (s -> r.c) of (out_s(source) - out_s(current))

where ``x_r`` is the residual stream the receiver reads in this (patched) pass,
``out_s(current)`` the sender's contribution in this pass and ``out_s(source)``
its contribution in the unpatched source run. Token-specific edges apply at their
position only. The receiver is then recomputed exactly: a head channel from the
block's input norm and its q/k/v projection (only that head's or key/value head's
slice is replaced), an MLP from its own pre-norm, the logits from the final norm.
Everything downstream follows. The batch holds one edge set per row.

Sender contributions: the embeddings (block 0's input); a head's output through
its slice of the output projection, without the bias (which belongs to no
sender); an MLP's output as added to the residual stream. Gemma's post-attention
norm is split over heads with the norm scale of the whole attention output of
the same pass, so the contributions still sum to the branch output.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from .components import Site
from .graph import Channel, Edge, Graph, Node, NodeKind
from .metrics import Metric, Targets
from .models import PatchModel
from .runner import RunCache, chunk_rows, rows_per_chunk, skip_value

__all__ = ["graph_cache_sites", "head_contributions", "edge_patch_rows"]



def graph_cache_sites(model: PatchModel) -> set[tuple[Site, int]]:
    """The (site, layer) activations a source cache needs for edge patching."""
    n = model.layout.n_layers
    return {(s, layer) for layer in range(n) for s in (Site.RESID_PRE, Site.HEAD, Site.MLP_OUT)}


def head_contributions(model: PatchModel, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's contribution to the residual stream, ``[batch, pos, head, d_model]``,
    from its output ``z`` (``[batch, pos, head, d_head]``)."""
    adapter, hf = model.adapter, model.hf
    out = torch.einsum("bthe,hed->bthd", z, adapter.head_weights(hf, layer, model.layout).to(z.dtype))
    if adapter.attn_post_norm():  # Gemma: post_attention_layernorm(sum_h o_h), RMS scale of the whole
        norm = adapter.module(hf, adapter.point(Site.ATTN_OUT, layer))
        total = out.sum(2).float()
        scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.float())
        out = (out.float() * scale[:, :, None, :]).to(z.dtype)
    return out


@dataclass
class _Plan:
    """Masks of one chunk, for each active receiver channel (node, channel)."""

    rows: torch.Tensor  # [batch] bool: rows where the channel has patched edges
    embed: torch.Tensor  # [batch, pos, 1]
    heads: dict[int, torch.Tensor]  # layer -> [batch, pos, head]
    mlps: dict[int, torch.Tensor]  # layer -> [batch, pos, 1]


def edge_patch_rows(model: PatchModel, graph: Graph, *, base_ids: torch.Tensor, base: RunCache, source: RunCache,
                    rows: Sequence[Sequence[Edge]], metric: Metric, targets: Targets,
                    memory_mb: float = 1024, progress: bool = True) -> torch.Tensor:
    """Metric of the base run with each row's edge set patched from the source run.

    Args:
        base_ids: the run patched into, ``[prompt, pos]``.
        base, source: caches of the base and source runs with `graph_cache_sites`
            (``[prompt, ...]``). A chunk whose earliest sender is at layer L skips
            blocks ``0..L-1``, fed the base run's residual stream: nothing below
            the first patched sender can change.
        rows: one set of edges of `graph` per row.

    Returns:
        Metric values, ``[row, prompt]``.

    Raises:
        ValueError: an edge that is not in `graph` (a sender that the receiver does not read).
    """
    for row in rows:
        for edge in row:
            if edge.sender not in graph.senders_into(edge.receiver) or \
                    (edge.pos is not None and not 0 <= edge.pos < base_ids.shape[1]):
                raise ValueError(f"edge {edge.label} is not an edge of this model's graph")
    n_prompts, n_pos = base_ids.shape
    src = _source_values(model, source)
    limit = rows_per_chunk(model, n_prompts, n_pos, memory_mb)
    out = torch.empty(len(rows), n_prompts)
    starts = [min((0 if e.sender.kind is NodeKind.EMBED else e.sender.layer for e in row),
                  default=model.layout.n_layers - 1) for row in rows]
    for chunk in tqdm(chunk_rows(starts, limit), desc="edge patching", unit="pass", disable=not progress, leave=False):
        logits = _run_chunk(model, base_ids, skip_value(model, base, starts[chunk[0]], len(chunk)),
                            starts[chunk[0]], src, [rows[r] for r in chunk])
        out[chunk] = metric(logits, targets.repeat(len(chunk))).reshape(len(chunk), n_prompts).cpu()
    return out


def _source_values(model: PatchModel, source: RunCache) -> dict:
    """Source-run sender values: head outputs z where the output projection is linear
    in them, else the per-head contributions (Gemma's post-norm)."""
    n = model.layout.n_layers
    heads = {layer: source.acts[(Site.HEAD, layer)] for layer in range(n)}
    if model.adapter.attn_post_norm():
        heads = {layer: head_contributions(model, layer, z) for layer, z in heads.items()}
    return {"embed": source.acts[(Site.RESID_PRE, 0)], "heads": heads,
            "mlps": {layer: source.acts[(Site.MLP_OUT, layer)] for layer in range(n)}}


def _plan(model: PatchModel, rows: Sequence[Sequence[Edge]], n_prompts: int, n_pos: int) -> dict:
    n_rows = len(rows)
    plans: dict[tuple[Node, Channel], _Plan] = {}
    for r, row in enumerate(rows):
        for edge in row:
            key = (edge.receiver, edge.channel)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = _Plan(rows=torch.zeros(n_rows, dtype=torch.bool),
                                          embed=torch.zeros(n_rows, n_pos, 1), heads={}, mlps={})
            plan.rows[r] = True
            pos = slice(None) if edge.pos is None else edge.pos
            s = edge.sender
            if s.kind is NodeKind.EMBED:
                plan.embed[r, pos] = 1.0
            elif s.kind is NodeKind.HEAD:
                plan.heads.setdefault(s.layer, torch.zeros(n_rows, n_pos, model.layout.n_heads))[r, pos, s.head] = 1.0
            else:
                plan.mlps.setdefault(s.layer, torch.zeros(n_rows, n_pos, 1))[r, pos] = 1.0
    expand = lambda m: m.repeat_interleave(n_prompts, dim=0).to(model.device)  # row r -> batch rows r*P..r*P+P-1
    return {key: _Plan(rows=expand(p.rows), embed=expand(p.embed), heads={k: expand(v) for k, v in p.heads.items()},
                       mlps={k: expand(v) for k, v in p.mlps.items()}) for key, p in plans.items()}


def _run_chunk(model: PatchModel, base_ids: torch.Tensor, skip_to, start: int, src: dict, rows) -> torch.Tensor:
    adapter, layout, nn, hf = model.adapter, model.layout, model.nn, model.hf
    n_rows, (n_prompts, n_pos) = len(rows), base_ids.shape
    plans = _plan(model, rows, n_prompts, n_pos)
    rep = lambda t: t.repeat(n_rows, *([1] * (t.dim() - 1))).to(model.device)
    by_layer: dict[int, list] = defaultdict(list)  # head receivers per layer
    for node, channel in plans:
        if node.kind in (NodeKind.HEAD, NodeKind.KV_HEAD):
            by_layer[node.layer].append((node, channel))
    head_layers = {layer for p in plans.values() for layer in p.heads}
    mlp_layers = {layer for p in plans.values() for layer in p.mlps}
    ids = base_ids.repeat(n_rows, 1).to(model.device)
    linear_heads = not adapter.attn_post_norm()
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1):
        delta = {key: torch.zeros(ids.shape[0], n_pos, layout.d_model, device=model.device) for key in plans}
        for layer in range(start):
            adapter.block(nn, layer).skip(skip_to)
        for layer in range(start, layout.n_layers):
            block = adapter.block(nn, layer)
            resid = block.input
            if layer == 0:
                for key, plan in plans.items():
                    delta[key] = delta[key] + plan.embed * (rep(src["embed"]) - resid)
            if by_layer[layer]:
                _patch_head_inputs(model, layer, resid, by_layer[layer], plans, delta)
            if layer in head_layers:
                z = adapter.view(Site.HEAD, adapter.module(nn, adapter.point(Site.HEAD, layer)).input, layout)
                if linear_heads:  # sum_h m_h W_h (z_src - z)_h, one matmul per receiver channel
                    diff, w = rep(src["heads"][layer]) - z, adapter.head_weights(hf, layer, layout).flatten(0, 1)
                    for key, plan in plans.items():
                        if layer in plan.heads:
                            delta[key] = delta[key] + (diff * plan.heads[layer][..., None]).flatten(2) @ w
                else:
                    diff = rep(src["heads"][layer]) - head_contributions(model, layer, z)
                    for key, plan in plans.items():
                        if layer in plan.heads:
                            delta[key] = delta[key] + torch.einsum("bthd,bth->btd", diff, plan.heads[layer])
            mlp_key = (Node(NodeKind.MLP, layer), Channel.IN)
            if mlp_key in plans:
                norm = adapter.module(nn, adapter.mlp_in_point(layer))
                norm.input = norm.input + delta[mlp_key]
            if layer in mlp_layers:
                mlp_out = adapter.module(nn, adapter.point(Site.MLP_OUT, layer)).output
                diff = rep(src["mlps"][layer]) - mlp_out
                for key, plan in plans.items():
                    if layer in plan.mlps:
                        delta[key] = delta[key] + plan.mlps[layer] * diff
        logits_key = (Node(NodeKind.LOGITS), Channel.IN)
        if logits_key in plans:
            final = adapter.final_norm_module(nn)
            final.input = final.input + delta[logits_key]
        logits = nnsight.save(nn.output.logits[:, -1])
    return logits


def _patch_head_inputs(model: PatchModel, layer: int, resid, receivers, plans, delta) -> None:
    """Recompute the q/k/v projection slice of each receiver head from its own patched residual."""
    adapter, layout, nn, hf = model.adapter, model.layout, model.nn, model.hf
    norm = adapter.attn_norm_module(hf, layer)
    by_point = defaultdict(list)
    for node, channel in receivers:
        by_point[adapter.point(channel.site, layer)].append((node, channel))
    for point in sorted(by_point, key=lambda p: p.sort_key):
        proj_env = adapter.module(nn, point)
        proj = adapter.module(hf, point)
        raw = proj_env.output
        new = raw
        for node, channel in by_point[point]:
            site, plan = channel.site, plans[(node, channel)]
            # type(m).forward(m, x) calls the module without nnsight's hooks: a side computation.
            recomputed = type(proj).forward(proj, type(norm).forward(norm, resid + delta[(node, channel)]))
            view = adapter.view(site, new, layout).clone()
            patched = adapter.view(site, recomputed, layout)[:, :, node.head]
            view[:, :, node.head] = torch.where(plan.rows[:, None, None], patched, view[:, :, node.head])
            new = adapter.unview(site, new, view, layout)
        proj_env.output = new
