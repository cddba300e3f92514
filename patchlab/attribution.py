"""Edge attribution patching: first-order scores for every edge of the graph at once.

**EAP** (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
Discovery", arXiv 2310.10348) estimates the effect of patching edge ``s -> r.c``
(the definition in `patchlab.graph_runner`) by a first-order Taylor expansion
around the base run:

    score(s -> r.c) = sum over pos of (out_s(source) - out_s(base)) . d m / d x_{r,c}

averaged over prompts, where ``x_{r,c}`` is the residual stream that channel ``c``
of receiver ``r`` reads (before its norm): the gradient reaches it only through
that receiver's own norm and q/k/v slice (or MLP, or unembedding). Two cached
forward passes and one forward+backward pass score every edge.

**EAP-IG** (Hanna et al. 2024, "Have Faith in Faithfulness", arXiv 2403.17806)
replaces the gradient by its mean over ``steps`` points on the straight line from
the base run's embeddings towards the source run's, ``alpha = k / steps`` for
``k = 0 .. steps-1`` (so ``steps=1`` is EAP).

Scores are estimates of ``m(patched) - m(base)`` in the metric's units, the same
quantity as `patchlab.exact_edge_scores`; the default direction is noising (base =
clean, source = corrupted). Attribution is known to fail where attention saturates
and where direct and indirect effects cancel (Kramar et al. 2024, AtP*); compare
with exact scores (`patchlab.agreement`).
"""

from __future__ import annotations

from typing import Callable

import nnsight
import torch
import xarray as xr

from .components import Site
from .circuit import edge_scores, score_attrs
from .data import PromptPairDataset
from .graph import Channel, Graph, Node, NodeKind
from .graph_runner import head_contributions
from .metrics import Direction, Metric, Targets, get_metric
from .models import PatchModel
from .patching import Runs, tokenize_for
from .runner import RunCache, cache_runs

__all__ = ["eap", "eap_ig"]


def eap(model: PatchModel, dataset: PromptPairDataset, *, metric: Metric | str = Metric.LOGIT_DIFF,
        direction: Direction | str = Direction.NOISING, per_position: bool = False,
        seed: int | None = None) -> xr.Dataset:
    """Edge attribution patching (EAP) scores of every edge.

    Args:
        metric: what the gradient is taken of (default logit difference, nats). KL to
            the clean run has zero gradient at the clean run: with noising it scores 0.
        direction: noising (base clean, source corrupted; default) or denoising.
        per_position: score token-specific edges (``Graph.from_model(model, n_pos=...)``)
            instead of all-token edges.
        seed: recorded in attrs (EAP is deterministic).

    Returns:
        Edge scores (`patchlab.circuit.edge_scores`): ``score`` (edge), estimated
        ``m(patched) - m(base)`` in the metric's units; attrs ``method="eap"``,
        metric, direction, baselines and provenance.
    """
    return _attribute(model, dataset, steps=1, method="eap", metric=metric, direction=direction,
                      per_position=per_position, seed=seed)


def eap_ig(model: PatchModel, dataset: PromptPairDataset, *, steps: int = 5, metric: Metric | str = Metric.LOGIT_DIFF,
           direction: Direction | str = Direction.NOISING, per_position: bool = False,
           seed: int | None = None) -> xr.Dataset:
    """EAP with integrated gradients (EAP-IG, Hanna et al. 2024): the gradient is averaged
    over `steps` interpolations of the input embeddings from the base towards the source run.

    Args:
        steps: interpolation steps ``m`` (5 is typical; 1 equals `eap`). The batch holds
            ``steps * n_prompts`` sequences.
        metric, direction, per_position, seed: as in `eap`.

    Returns:
        Edge scores as in `eap`, with attrs ``method="eap_ig"`` and ``ig_steps``.

    Raises:
        ValueError: steps < 1.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: EAP-IG needs at least one interpolation step")
    return _attribute(model, dataset, steps=steps, method="eap_ig", metric=metric, direction=direction,
                      per_position=per_position, seed=seed)


def _attribute(model, dataset, *, steps, method, metric, direction, per_position, seed) -> xr.Dataset:
    tokens = tokenize_for(model, dataset)
    metric, direction = get_metric(metric), Direction(direction)
    noising = direction is Direction.NOISING
    base_ids, source_ids = (tokens.clean_ids, tokens.corrupted_ids) if noising else (tokens.corrupted_ids, tokens.clean_ids)
    (source,) = cache_runs(model, [source_ids], _sender_sites(model))
    # The gradient pass is also the base run (its alpha = 0 rows): two forward passes in all.
    grads, base, targets = receiver_gradients(model, base_ids, source, tokens, metric, steps, clean_is_base=noising)
    clean, corrupted = (base, source) if noising else (source, base)
    runs = Runs(metric, direction, targets, base_ids, base, source,
                {"metric": metric, "direction": direction, "clean": metric(clean.logits, targets).cpu(),
                 "corrupted": metric(corrupted.logits, targets).cpu()})
    graph = Graph.from_model(model, n_pos=tokens.n_pos if per_position else None)
    deltas = sender_differences(model, runs)  # node -> [prompt, pos, d_model]
    d = torch.stack([deltas[s] for s in graph.senders])  # [sender, prompt, pos, d_model]
    g = torch.stack([grads[r] for r in graph.receivers])  # [receiver, prompt, pos, d_model]
    values = _edge_values(graph, d, g, per_position) / tokens.n_prompts
    edges = list(graph.edges())
    attrs = score_attrs(model, dataset, runs, method=method, seed=seed, per_position=int(per_position),
                        **({"ig_steps": steps} if method == "eap_ig" else {}))
    return edge_scores(edges, values.double().numpy(), graph=graph, attrs=attrs)


def _edge_values(graph: Graph, d: torch.Tensor, g: torch.Tensor, per_position: bool) -> torch.Tensor:
    """``sum over prompts (and positions) of d[sender] . g[receiver]`` for every edge, in
    `Graph.edges` order (receiver, sender, position)."""
    n_pos = d.shape[2]
    d = d.permute(2, 0, 1, 3).flatten(2) if per_position else d.flatten(1)[None]  # [pos or 1, sender, n]
    g = g.permute(2, 0, 1, 3).flatten(2) if per_position else g.flatten(1)[None]  # [pos or 1, receiver, n]
    # A receiver's senders are a prefix of the senders, and receivers come in topological order:
    # each run of receivers with the same senders is one matmul.
    reach = [len(graph.senders_into(node)) for node, _ in graph.receivers]
    table = torch.zeros(d.shape[0], d.shape[1], g.shape[1], dtype=d.dtype)
    start = 0
    for j in range(1, len(reach) + 1):
        if j == len(reach) or reach[j] != reach[start]:
            table[:, :reach[start], start:j] = d[:, :reach[start]] @ g[:, start:j].transpose(1, 2)
            start = j
    rows = torch.cat([torch.arange(r) for r in reach])
    cols = torch.arange(len(reach)).repeat_interleave(torch.tensor(reach))
    if not per_position:
        return table[0, rows, cols]
    pos = torch.arange(n_pos).repeat(len(rows))
    return table[pos, rows.repeat_interleave(n_pos), cols.repeat_interleave(n_pos)]


def sender_differences(model: PatchModel, runs) -> dict:
    """``out_s(source) - out_s(base)`` of every sender, ``[prompt, pos, d_model]``."""
    graph = Graph.from_model(model)
    out = {}
    for s in graph.senders:
        if s.kind is NodeKind.EMBED:
            out[s] = runs.source.acts[(Site.RESID_PRE, 0)] - runs.base.acts[(Site.RESID_PRE, 0)]
        elif s.kind is NodeKind.MLP:
            out[s] = runs.source.acts[(Site.MLP_OUT, s.layer)] - runs.base.acts[(Site.MLP_OUT, s.layer)]
    for layer in range(model.layout.n_layers):
        contrib = lambda run: head_contributions(model, layer, run.acts[(Site.HEAD, layer)])
        diff = contrib(runs.source) - contrib(runs.base)
        for h in range(model.layout.n_heads):
            out[Node(NodeKind.HEAD, layer, h)] = diff[:, :, h]
    return {k: v.cpu() for k, v in out.items()}


def _sender_sites(model: PatchModel) -> set[tuple[Site, int]]:
    n = model.layout.n_layers
    return {(Site.RESID_PRE, 0)} | {(s, layer) for layer in range(n) for s in (Site.HEAD, Site.MLP_OUT)}


def receiver_gradients(model: PatchModel, base_ids: torch.Tensor, source: RunCache, tokens, metric: Metric,
                       steps: int, *, clean_is_base: bool) -> tuple[dict, RunCache, Targets]:
    """``d m / d x_{r,c}`` of every receiver channel, ``[prompt, pos, d_model]``, averaged
    over `steps` points ``alpha = k / steps`` between the base (0) and source (1) embeddings.

    Also returns the base run (the alpha = 0 rows: sender activations and logits, as a
    `RunCache`) and the metric's targets (clean log-probabilities from the clean run)."""
    adapter, layout, nn, hf = model.adapter, model.layout, model.nn, model.hf
    n, n_prompts = layout.n_layers, base_ids.shape[0]
    source_embed = source.acts[(Site.RESID_PRE, 0)].to(model.device).repeat(steps, 1, 1)
    alpha = (torch.arange(steps, device=model.device) / steps).repeat_interleave(n_prompts)[:, None, None]
    ids = base_ids.repeat(steps, 1).to(model.device)
    head_points = sorted({adapter.point(site, layer) for layer in range(n) for site in (Site.Q, Site.K, Site.V)},
                         key=lambda p: p.sort_key)
    # Forward with gradients: inputs (x) and outputs (y) of every receiver's norm/projection,
    # and the sender activations (acts) of the base run.
    with torch.enable_grad(), nn.trace(ids, logits_to_keep=1):
        x, y, acts = nnsight.save({}), nnsight.save({}), nnsight.save({})  # only saved values leave the trace
        block0 = adapter.block(nn, 0)
        embed = block0.input
        acts[(Site.RESID_PRE, 0)] = embed[:n_prompts].detach().clone()
        # A leaf that requires grad: the weights are frozen.
        block0.input = (embed + alpha.to(embed.dtype) * (source_embed - embed)).detach().requires_grad_(True)
        for layer in range(n):
            x[("attn", layer)] = nnsight.save(adapter.block(nn, layer).input)
            for point in (p for p in head_points if p.layer == layer):
                y[point] = nnsight.save(adapter.module(nn, point).output)
            z = adapter.module(nn, adapter.point(Site.HEAD, layer)).input
            acts[(Site.HEAD, layer)] = adapter.view(Site.HEAD, z[:n_prompts].detach(), layout).clone()
            mlp_norm = adapter.module(nn, adapter.mlp_in_point(layer))
            x[("mlp", layer)] = nnsight.save(mlp_norm.input)
            y[("mlp", layer)] = nnsight.save(mlp_norm.output)
            acts[(Site.MLP_OUT, layer)] = adapter.module(nn, adapter.point(Site.MLP_OUT, layer)).output[:n_prompts].detach().clone()
        final = adapter.final_norm_module(nn)
        x["final"] = nnsight.save(final.input)
        y["final"] = nnsight.save(final.output)
        logits = nnsight.save(nn.output.logits[:, -1])
    base = RunCache(acts=dict(acts), logits=logits[:n_prompts].detach())
    clean_logits = base.logits if clean_is_base else source.logits
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids,
                      clean_logprobs=torch.log_softmax(clean_logits.float(), dim=-1))
    value = metric(logits, targets.repeat(steps)).sum()  # prompts are independent: one backward
    got = dict(zip(y, torch.autograd.grad(value, list(y.values()))))
    mean = lambda g: g.reshape(steps, -1, *g.shape[1:]).mean(0).detach().cpu()
    out = {}
    for layer in range(n):
        # Per head: back through that head's slice of the (linear) projection, then the shared norm.
        receivers, cotangents = [], []
        for site in (Site.Q, Site.K, Site.V):
            point = adapter.point(site, layer)
            weight, _ = adapter.input_head_weights(hf, site, layer, layout)  # [d_model, head, d_head]
            g = adapter.view(site, got[point], layout)  # [batch, pos, head, d_head]
            cotangents.append(torch.einsum("bphe,dhe->hbpd", g, weight.to(g.dtype)))
            kind = NodeKind.KV_HEAD if site is not Site.Q and layout.n_kv_heads != layout.n_heads else NodeKind.HEAD
            receivers += [(Node(kind, layer, h), Channel(site.value)) for h in range(g.shape[2])]
        norm = adapter.attn_norm_module(hf, layer)
        per_head = _input_grads(lambda t: _call(norm, t), x[("attn", layer)].detach(), torch.cat(cotangents))
        out.update({r: mean(g) for r, g in zip(receivers, per_head)})
        mlp_norm = adapter.module(hf, adapter.mlp_in_point(layer))
        g = _input_grads(lambda t: _call(mlp_norm, t), x[("mlp", layer)].detach(), got[("mlp", layer)][None])
        out[(Node(NodeKind.MLP, layer), Channel.IN)] = mean(g[0])
    final = adapter.final_norm_module(hf)
    g = _input_grads(lambda t: _call(final, t), x["final"].detach(), got["final"][None])
    out[(Node(NodeKind.LOGITS), Channel.IN)] = mean(g[0])
    return out, base, targets


def _call(module, x):
    # type(m).forward(m, x) runs the module's computation without nnsight's hooks.
    return type(module).forward(module, x)


def _input_grads(fn: Callable, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian products of `fn` at `x` for each cotangent: ``[n, *x.shape]``
    (one forward, the backward vectorised over the cotangents)."""
    with torch.enable_grad():
        _, vjp = torch.func.vjp(fn, x)
        return torch.vmap(vjp)(cotangents)[0]
