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

Large edge sets (circuit evaluation, ACDC) use the complement: the residual
stream is the sum of all sender contributions plus constants (biases), so a
channel with most of its edges patched reads the source run's residual plus
``out_s(current) - out_s(source)`` of its few unpatched edges, and a channel with
all edges patched reads the source residual (for a head: the source run's q/k/v
slice). Both forms are exact; the cost follows the smaller set.

Sender contributions: the embeddings (block 0's input); a head's output through
its slice of the output projection, without the bias (which belongs to no
sender); an MLP's output as added to the residual stream. Gemma's post-attention
norm is split over heads with the norm scale of the whole attention output of
the same pass, so the contributions still sum to the branch output.
"""

from __future__ import annotations

import functools
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
    sites = {(s, layer) for layer in range(n) for s in (Site.RESID_PRE, Site.HEAD, Site.MLP_OUT)}
    if model.adapter.has_resid_mid(model.hf.config):
        sites |= {(Site.RESID_MID, layer) for layer in range(n)}
    return sites | {(Site.RESID_POST, n - 1)}


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
class _Key:
    """How one receiver channel is patched in one chunk (batch rows ``N = rows * prompts``)."""

    flip: torch.Tensor  # [N, 1, 1]: rows read the source residual (plus corrections)
    full: torch.Tensor  # [N] bool: rows with every incoming edge patched at every position
    partial: torch.Tensor  # [N] bool: rows with some but not all edges patched
    embed: torch.Tensor | None  # coefficients of the sender differences: [N, pos, 1]
    heads: dict[int, torch.Tensor]  # layer -> [N, pos, head]
    mlps: dict[int, torch.Tensor]  # layer -> [N, pos, 1]

    @property
    def has_terms(self) -> bool:
        return self.embed is not None or bool(self.heads) or bool(self.mlps)


def edge_patch_rows(model: PatchModel, graph: Graph, *, base_ids: torch.Tensor, base: RunCache, source: RunCache,
                    rows: Sequence[Sequence[Edge]], metric: Metric, targets: Targets,
                    memory_mb: float = 1024, progress: bool = True) -> torch.Tensor:
    """Metric of the base run with each row's edge set patched from the source run.

    Args:
        base_ids: the run patched into, ``[prompt, pos]``.
        base, source: caches of the base and source runs with `graph_cache_sites`
            (``[prompt, ...]``). A chunk whose earliest changed sender is at layer L
            skips blocks ``0..L-1``, fed the base run's residual stream.
        rows: one set of edges of `graph` per row (any size, up to every edge).

    Returns:
        Metric values, ``[row, prompt]``.

    Raises:
        ValueError: an edge that is not in `graph` (a sender that the receiver does not read).
    """
    n_prompts, n_pos = base_ids.shape
    rows = [_checked(graph, row, n_pos) for row in rows]
    summaries = [_summary(model, graph, row, n_pos) for row in rows]
    src = _source_values(model, source)
    limit = rows_per_chunk(model, n_prompts, n_pos, memory_mb)
    out = torch.empty(len(rows), n_prompts)
    starts = [start for start, _, _ in summaries]
    weights = [1 + n_terms / 8 for _, _, n_terms in summaries]  # a correction term costs ~1/8 of a row's activations
    for chunk in tqdm(chunk_rows(starts, limit, weights), desc="edge patching", unit="pass",
                      disable=not progress, leave=False):
        keys = _plan(model, graph, [rows[r] for r in chunk], [summaries[r][1] for r in chunk], n_prompts, n_pos)
        logits = _run_chunk(model, base_ids, skip_value(model, base, starts[chunk[0]], len(chunk)),
                            starts[chunk[0]], src, keys, len(chunk))
        out[chunk] = metric(logits, targets.repeat(len(chunk))).reshape(len(chunk), n_prompts).cpu()
    return out


def _checked(graph: Graph, row: Sequence[Edge], n_pos: int) -> frozenset[Edge]:
    row = frozenset(row)
    if row <= _edges(graph) and (graph.n_pos is None or graph.n_pos == n_pos):
        return row
    for edge in row:
        if edge.sender not in _senders(graph, edge.receiver) or \
                (edge.pos is not None and not 0 <= edge.pos < n_pos):
            raise ValueError(f"edge {edge.label} is not an edge of this model's graph")
        if edge.pos is not None and edge.with_pos(None) in row:
            raise ValueError(f"edge {edge.label} is given both at one position and at all positions")
    return row


@functools.lru_cache(maxsize=8)
def _edges(graph: Graph) -> frozenset[Edge]:
    return frozenset(graph.edges())


@functools.lru_cache(maxsize=4096)
def _senders(graph: Graph, receiver: Node) -> frozenset[Node]:
    return frozenset(graph.senders_into(receiver))


def _layer(node: Node, n_layers: int) -> int:
    return 0 if node.kind is NodeKind.EMBED else n_layers - 1 if node.kind is NodeKind.LOGITS else node.layer


def _summary(model: PatchModel, graph: Graph, row: frozenset[Edge], n_pos: int):
    """(start layer, receiver channels in complement form, number of correction terms) of one row."""
    n = model.layout.n_layers
    by_key: dict[tuple[Node, Channel], list[Edge]] = defaultdict(list)
    for edge in row:
        by_key[(edge.receiver, edge.channel)].append(edge)
    layers, flipped, n_terms = [n - 1], set(), 0
    for key, edges in by_key.items():
        senders = _senders(graph, key[0])
        patched = sum(n_pos if e.pos is None else 1 for e in edges)
        if 2 * patched > len(senders) * n_pos:  # complement form: terms for the unpatched edges
            flipped.add(key)
            covered = defaultdict(int)
            for e in edges:
                covered[e.sender] += n_pos if e.pos is None else 1
            kept = [s for s in senders if covered[s] < n_pos]
            layers += [_layer(s, n) for s in kept] + [_layer(key[0], n)]
            n_terms += bool(kept)
        else:
            layers += [_layer(e.sender, n) for e in edges]
            n_terms += 1
    return min(layers), frozenset(flipped), n_terms


def _source_values(model: PatchModel, source: RunCache) -> dict:
    """Source-run sender values (head outputs z where the output projection is linear
    in them, else the per-head contributions: Gemma's post-norm) and the residual
    stream each receiver kind reads."""
    n, adapter = model.layout.n_layers, model.adapter
    heads = {layer: source.acts[(Site.HEAD, layer)] for layer in range(n)}
    if adapter.attn_post_norm():
        heads = {layer: head_contributions(model, layer, z) for layer, z in heads.items()}
    mid = Site.RESID_MID if adapter.has_resid_mid(model.hf.config) else Site.RESID_PRE
    return {"embed": source.acts[(Site.RESID_PRE, 0)], "heads": heads,
            "mlps": {layer: source.acts[(Site.MLP_OUT, layer)] for layer in range(n)},
            "resid_pre": {layer: source.acts[(Site.RESID_PRE, layer)] for layer in range(n)},
            "resid_mlp": {layer: source.acts[(mid, layer)] for layer in range(n)},
            "resid_final": source.acts[(Site.RESID_POST, n - 1)]}


@functools.lru_cache(maxsize=16)
def _sender_columns(n_layers: int, n_heads: int) -> dict[Node, int]:
    """Column of each sender in the dense coefficient matrix: embed, then per layer its heads and MLP."""
    columns = {Node(NodeKind.EMBED): 0}
    for layer in range(n_layers):
        for h in range(n_heads):
            columns[Node(NodeKind.HEAD, layer, h)] = 1 + layer * (n_heads + 1) + h
        columns[Node(NodeKind.MLP, layer)] = 1 + layer * (n_heads + 1) + n_heads
    return columns


def _plan(model: PatchModel, graph: Graph, rows: Sequence[frozenset[Edge]], flipped: Sequence[frozenset],
          n_prompts: int, n_pos: int) -> dict[tuple[Node, Channel], _Key]:
    n_rows, n_layers, n_heads = len(rows), model.layout.n_layers, model.layout.n_heads
    column = _sender_columns(n_layers, n_heads)
    n_senders = len(column)
    entries: dict[tuple[Node, Channel], list[tuple[int, int, int]]] = defaultdict(list)  # (row, pos or -1, sender)
    for r, row in enumerate(rows):
        for e in row:
            entries[(e.receiver, e.channel)].append((r, -1 if e.pos is None else e.pos, column[e.sender]))
    expand = lambda t: t.repeat_interleave(n_prompts, dim=0).to(model.device)  # row r -> batch rows r*P..r*P+P-1
    keys = {}
    for key, items in entries.items():
        r, p, s = torch.tensor(items).T
        mask = torch.zeros(n_rows, n_pos, n_senders)
        every_pos = p < 0
        mask[r[every_pos], :, s[every_pos]] = 1.0
        mask[r[~every_pos], p[~every_pos], s[~every_pos]] = 1.0
        valid = torch.zeros(n_senders)
        valid[[column[s] for s in _senders(graph, key[0])]] = 1.0
        flip = torch.tensor([key in f for f in flipped])
        coef = torch.where(flip[:, None, None], mask - valid, mask)  # complement: -1 on unpatched edges
        patched = (mask > 0).flatten(1).sum(1)
        full = patched == valid.sum() * n_pos
        partial = (patched > 0) & ~full
        if key[0].kind in (NodeKind.HEAD, NodeKind.KV_HEAD):
            flip = flip & ~full  # fully patched heads take the source projection directly
        used = coef.abs().sum((0, 1))  # [sender]: which columns carry a term
        per_layer = coef[..., 1:].unflatten(-1, (n_layers, n_heads + 1))  # [row, pos, layer, head + mlp]
        used_layers = used[1:].view(n_layers, n_heads + 1)
        keys[key] = _Key(
            flip=expand(flip.float()[:, None, None]), full=expand(full), partial=expand(partial),
            embed=expand(coef[..., :1]) if used[0] > 0 else None,
            heads={layer: expand(per_layer[:, :, layer, :n_heads])
                   for layer in used_layers[:, :n_heads].sum(1).nonzero().flatten().tolist()},
            mlps={layer: expand(per_layer[:, :, layer, n_heads:])
                  for layer in used_layers[:, n_heads].nonzero().flatten().tolist()})
    return keys


def _run_chunk(model: PatchModel, base_ids: torch.Tensor, skip_to, start: int, src: dict,
               keys: dict[tuple[Node, Channel], _Key], n_rows: int) -> torch.Tensor:
    adapter, layout, nn, hf = model.adapter, model.layout, model.nn, model.hf
    n_prompts, n_pos = base_ids.shape
    rep = lambda t: t.repeat(n_rows, *([1] * (t.dim() - 1))).to(model.device)
    by_layer: dict[int, list] = defaultdict(list)  # head receivers per layer
    for node, channel in keys:
        if node.kind in (NodeKind.HEAD, NodeKind.KV_HEAD):
            by_layer[node.layer].append((node, channel))
    head_layers = {layer for k in keys.values() for layer in k.heads}
    mlp_layers = {layer for k in keys.values() for layer in k.mlps}
    ids = base_ids.repeat(n_rows, 1).to(model.device)
    linear_heads = not adapter.attn_post_norm()
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1):
        delta = {key: torch.zeros(ids.shape[0], n_pos, layout.d_model, device=model.device)
                 for key, k in keys.items() if k.has_terms}
        for layer in range(start):
            adapter.block(nn, layer).skip(skip_to)
        for layer in range(start, layout.n_layers):
            block = adapter.block(nn, layer)
            resid = block.input
            if layer == 0:
                for key, k in keys.items():
                    if k.embed is not None:
                        delta[key] = delta[key] + k.embed * (rep(src["embed"]) - resid)
            if by_layer[layer]:
                _patch_head_inputs(model, layer, resid, rep(src["resid_pre"][layer]), by_layer[layer], keys, delta)
            if layer in head_layers:
                z = adapter.view(Site.HEAD, adapter.module(nn, adapter.point(Site.HEAD, layer)).input, layout)
                if linear_heads:  # sum_h c_h W_h (z_src - z)_h, one matmul per receiver channel
                    diff, w = rep(src["heads"][layer]) - z, adapter.head_weights(hf, layer, layout).flatten(0, 1)
                    for key, k in keys.items():
                        if layer in k.heads:
                            delta[key] = delta[key] + (diff * k.heads[layer][..., None]).flatten(2) @ w
                else:
                    diff = rep(src["heads"][layer]) - head_contributions(model, layer, z)
                    for key, k in keys.items():
                        if layer in k.heads:
                            delta[key] = delta[key] + torch.einsum("bthd,bth->btd", diff, k.heads[layer])
            mlp_key = (Node(NodeKind.MLP, layer), Channel.IN)
            if mlp_key in keys:
                norm = adapter.module(nn, adapter.mlp_in_point(layer))
                norm.input = _patched_input(norm.input, rep(src["resid_mlp"][layer]), keys[mlp_key], delta.get(mlp_key))
            if layer in mlp_layers:
                mlp_out = adapter.module(nn, adapter.point(Site.MLP_OUT, layer)).output
                diff = rep(src["mlps"][layer]) - mlp_out
                for key, k in keys.items():
                    if layer in k.mlps:
                        delta[key] = delta[key] + k.mlps[layer] * diff
        logits_key = (Node(NodeKind.LOGITS), Channel.IN)
        if logits_key in keys:
            final = adapter.final_norm_module(nn)
            final.input = _patched_input(final.input, rep(src["resid_final"]), keys[logits_key], delta.get(logits_key))
        logits = nnsight.save(nn.output.logits[:, -1])
    return logits


def _patched_input(current, source_resid, key: _Key, delta):
    """What a receiver channel reads: its own residual plus the patched edges' differences,
    or (complement form) the source residual minus the unpatched edges' differences."""
    out = current + key.flip * (source_resid - current)
    return out if delta is None else out + delta


def _patch_head_inputs(model: PatchModel, layer: int, resid, source_resid, receivers, keys, delta) -> None:
    """Recompute the q/k/v slice of each receiver head from its own patched residual (all
    partially patched channels of a projection in one batched norm and matmul); fully
    patched heads take the slice of the source projection."""
    adapter, layout, nn, hf = model.adapter, model.layout, model.nn, model.hf
    norm = adapter.attn_norm_module(hf, layer)
    # type(m).forward(m, x) calls the module without nnsight's hooks: a side computation.
    normed = lambda x: type(norm).forward(norm, x)
    by_point = defaultdict(list)
    for node, channel in receivers:
        by_point[adapter.point(channel.site, layer)].append((node, channel))
    for point in sorted(by_point, key=lambda p: p.sort_key):
        proj_env = adapter.module(nn, point)
        new = proj_env.output
        by_site = defaultdict(list)
        for node, channel in by_point[point]:
            by_site[channel.site].append((node, keys[(node, channel)], delta.get((node, channel))))
        for site, group in by_site.items():
            weight, bias = adapter.input_head_weights(hf, site, layer, layout)  # [d, head, d_head], [head, d_head]
            view = adapter.view(site, new, layout).clone()
            full = [(node, key) for node, key, _ in group if key.full.any()]
            if full:
                source = torch.einsum("bpd,dhe->bphe", normed(source_resid), weight) + bias
                for node, key in full:
                    view[:, :, node.head] = torch.where(key.full[:, None, None], source[:, :, node.head],
                                                        view[:, :, node.head])
            partial = [(node, key, d) for node, key, d in group if key.partial.any()]
            if partial:
                x = torch.stack([_patched_input(resid, source_resid, key, d) for _, key, d in partial])
                heads = [node.head for node, _, _ in partial]
                recomputed = torch.einsum("kbpd,kde->kbpe", normed(x), weight[:, heads].transpose(0, 1)) \
                    + bias[heads][:, None, None, :]
                for (node, key, _), value in zip(partial, recomputed):
                    view[:, :, node.head] = torch.where(key.partial[:, None, None], value, view[:, :, node.head])
            new = adapter.unview(site, new, view, layout)
        proj_env.output = new
