"""Edge attribution patching program (EAP, EAP-IG): every edge's first-order score in one session.

Torch-only (see the package docstring): this module runs on the server too.

Orders shared with the client (`patchlab.attribution`):

- senders: the embeddings, then per layer its heads and its MLP (`patchlab.graph.Graph.senders`);
- receivers ("program order"): per layer the q channels of its heads, the k and v channels
  of its key/value heads, its MLP; then the logits.
"""

import torch

from .common import (at, block, cache_pass, head_contributions, input_head_weights, metric, mlp_in_point, module,
                     point, repeat_targets, torch_module, view, with_clean_logprobs)


def attribution_program(nn, spec):
    """Cache the source run, take the gradient pass (also the base run) and score every edge.

    `spec`: ``arch``; ``base_ids``, ``source_ids`` (``[prompt, pos]``); ``steps`` (interpolation
    points ``alpha = k / steps``); ``metric`` (name); ``targets`` (``correct``, ``incorrect``:
    ``[prompt]``); ``clean_is_base`` (whether the base run is the clean one, the KL reference);
    ``receivers`` (program-order index of each receiver, in the order of the edges); ``reach``
    (number of senders of each of those receivers: a prefix of the senders); ``per_position``;
    ``groups`` (optional): for left-padded prompts, ``[(prompt indices, length)]``, prompts whose
    base and source runs both have that many real tokens. Each group runs on its own, unpadded
    (a backward pass through fully masked padding rows would be NaN in a float64 model whose
    softmax is float32), and its scores are summed in; a token-specific score of a group's own
    position ``j`` belongs to the batch column ``pos - length + j``.

    Returns ``{"values": [edge], "runs": {"clean": [prompt], "corrupted": [prompt]}}``: the
    estimated ``m(patched) - m(base)`` of each edge (mean over prompts; edges by receiver,
    sender, position), and the metric of the two runs.
    """
    n_prompts, n_pos = spec["base_ids"].shape
    groups = spec.get("groups") or [(torch.arange(n_prompts), n_pos)]
    total, runs = None, {"clean": [None] * n_prompts, "corrupted": [None] * n_prompts}
    for index, length in groups:
        values, metrics = _score_group(nn, spec, index, n_pos - length)
        if spec["per_position"] and length < n_pos:  # the group's positions are the last `length` columns
            values = torch.nn.functional.pad(values.reshape(-1, length), (n_pos - length, 0)).flatten()
        total = values if total is None else total + values
        for name, value in metrics.items():
            for p, v in zip(index.tolist(), value):
                runs[name][p] = v
    return {"values": total / n_prompts, "runs": {name: torch.stack(v) for name, v in runs.items()}}


def _score_group(nn, spec, index, start):
    """The summed edge values of prompts `index` (their tokens from column `start` on) and their
    clean and corrupted metrics."""
    arch = spec["arch"]
    base_ids, source_ids = spec["base_ids"][index, start:], spec["source_ids"][index, start:]
    sites = [("resid_pre", 0)] + [(site, layer) for layer in range(arch["n_layers"]) for site in ("head", "mlp_out")]
    source = cache_pass(nn, arch, source_ids, ["source"], sites)
    x, y, base, logits = gradient_pass(nn, arch, base_ids, source[("source", "resid_pre", 0)], spec["steps"])
    clean_logits = base[("base", "logits")] if spec["clean_is_base"] else source[("source", "logits")]
    targets = with_clean_logprobs({k: v[index] for k, v in spec["targets"].items()}, clean_logits)
    value = metric(spec["metric"], logits, repeat_targets(targets, spec["steps"])).sum()  # prompts are independent
    with torch.enable_grad():
        got = dict(zip(y, torch.autograd.grad(value, list(y.values()))))
    grads = receiver_gradients(nn, arch, x, got, spec["steps"])
    g = torch.stack([grads[i] for i in spec["receivers"]])  # [receiver, prompt, pos, d_model]
    d = sender_differences(nn, arch, source, base)
    values = edge_values(d, g, spec["reach"], spec["per_position"])
    runs = {"base": metric(spec["metric"], base[("base", "logits")], targets),
            "source": metric(spec["metric"], source[("source", "logits")], targets)}
    clean, corrupted = ("base", "source") if spec["clean_is_base"] else ("source", "base")
    return values, {"clean": runs[clean], "corrupted": runs[corrupted]}


def gradient_pass(nn, arch, base_ids, source_embed, steps):
    """Forward with gradients over ``steps`` copies of the base run (``[prompt, pos]``), copy k
    starting from ``embed + (k / steps) (source_embed - embed)`` (block 0's input).

    Returns ``(x, y, base, logits)``: the inputs ``x`` and outputs ``y`` of every receiver's
    norm or projection (keys ``("attn", layer)``, q/k/v hook points, ``("mlp", layer)``,
    ``"final"``; ``[step * prompt, ...]``), the base run's sender activations and logits (the
    copy with alpha = 0, as a `cache_pass` dict of run "base"), and the final
    position's logits with their graph, ``[step * prompt, vocab]``.
    """
    n_prompts = base_ids.shape[0]
    source_embed = source_embed.repeat(steps, 1, 1)
    alpha = (torch.arange(steps, device=source_embed.device) / steps).repeat_interleave(n_prompts)[:, None, None]
    head_points = sorted({point(arch, site, layer) for layer in range(arch["n_layers"]) for site in "qkv"},
                         key=lambda p: (p[0], p[3]))
    x, y, base = {}, {}, {}
    with torch.enable_grad(), nn.trace(base_ids.repeat(steps, 1), logits_to_keep=1):
        block0 = block(nn, arch, 0)
        embed = block0.input
        base[("base", "resid_pre", 0)] = embed[:n_prompts].detach().clone()
        # A leaf that requires grad: the weights are frozen.
        block0.input = (embed + alpha.to(embed.dtype) * (source_embed.to(embed.device) - embed)).detach() \
            .requires_grad_(True)
        for layer in range(arch["n_layers"]):
            x[("attn", layer)] = block(nn, arch, layer).input
            for pt in (p for p in head_points if p[0] == layer):
                y[pt] = at(nn, arch, pt).output
            z = at(nn, arch, point(arch, "head", layer)).input
            base[("base", "head", layer)] = view(arch, "head", z[:n_prompts].detach()).clone()
            mlp_norm = at(nn, arch, mlp_in_point(arch, layer))
            x[("mlp", layer)] = mlp_norm.input
            y[("mlp", layer)] = mlp_norm.output
            mlp_out = at(nn, arch, point(arch, "mlp_out", layer)).output
            base[("base", "mlp_out", layer)] = mlp_out[:n_prompts].detach().clone()
        final = module(nn, arch["final_norm"])
        x["final"] = final.input
        y["final"] = final.output
        logits = nn.output.logits[:, -1]
    base[("base", "logits")] = logits[:n_prompts].detach()
    return x, y, base, logits


def receiver_gradients(nn, arch, x, got, steps):
    """``d m / d x_{r,c}`` of every receiver channel in program order, each ``[prompt, pos,
    d_model]`` and averaged over the steps, from the gradients `got` of the norm and
    projection outputs ``y`` (`gradient_pass`) at their inputs `x`."""
    mean = lambda g: g.reshape(steps, -1, *g.shape[1:]).mean(0).detach()
    out = []
    for layer in range(arch["n_layers"]):
        # Per head: back through that head's slice of the (linear) projection, then the shared norm.
        cotangents = []
        for site in "qkv":
            weight, _ = input_head_weights(nn, arch, site, layer)  # [d_model, head, d_head]
            g = view(arch, site, got[point(arch, site, layer)])  # [batch, pos, head, d_head]
            cotangents.append(torch.einsum("bphe,dhe->hbpd", g, weight.to(g.dtype)))
        norm = torch_module(module(block(nn, arch, layer), arch["attn_norm"]))
        out += [mean(g) for g in input_grads(norm, x[("attn", layer)].detach(), torch.cat(cotangents))]
        mlp_norm = torch_module(at(nn, arch, mlp_in_point(arch, layer)))
        out.append(mean(input_grads(mlp_norm, x[("mlp", layer)].detach(), got[("mlp", layer)][None])[0]))
    final = torch_module(module(nn, arch["final_norm"]))
    out.append(mean(input_grads(final, x["final"].detach(), got["final"][None])[0]))
    return out


def input_grads(norm, x, cotangents):
    """Vector-Jacobian products of the plain module `norm` (no nnsight hooks) at `x` for each
    cotangent: ``[n, *x.shape]`` (one forward, the backward vectorised over the cotangents)."""
    with torch.enable_grad():
        _, vjp = torch.func.vjp(lambda t: type(norm).forward(norm, t), x)
        return torch.vmap(vjp)(cotangents)[0]


def sender_differences(nn, arch, source, base):
    """``out_s(source) - out_s(base)`` of every sender, ``[sender, prompt, pos, d_model]``
    (senders: the embeddings, then per layer its heads and its MLP)."""
    diff = lambda site, layer: source[("source", site, layer)] - base[("base", site, layer)]
    out = [diff("resid_pre", 0)]
    for layer in range(arch["n_layers"]):
        heads = head_contributions(nn, arch, layer, source[("source", "head", layer)]) \
            - head_contributions(nn, arch, layer, base[("base", "head", layer)])  # [prompt, pos, head, d_model]
        out += [heads[:, :, h] for h in range(arch["n_heads"])] + [diff("mlp_out", layer)]
    return torch.stack(out)


def edge_values(d, g, reach, per_position):
    """``sum over prompts (and positions) of d[sender] . g[receiver]`` for every edge, ordered by
    receiver, sender (and position); receiver j reads the first ``reach[j]`` senders.

    `d`: ``[sender, prompt, pos, d_model]``; `g`: ``[receiver, prompt, pos, d_model]``.
    Returns ``[edge]``.
    """
    n_pos, device = d.shape[2], d.device
    d = d.permute(2, 0, 1, 3).flatten(2) if per_position else d.flatten(1)[None]  # [pos or 1, sender, n]
    g = g.permute(2, 0, 1, 3).flatten(2) if per_position else g.flatten(1)[None]  # [pos or 1, receiver, n]
    # Receivers come in topological order: each run of receivers with the same senders is one matmul.
    table = torch.zeros(d.shape[0], d.shape[1], g.shape[1], dtype=d.dtype, device=device)
    start = 0
    for j in range(1, len(reach) + 1):
        if j == len(reach) or reach[j] != reach[start]:
            table[:, :reach[start], start:j] = d[:, :reach[start]] @ g[:, start:j].transpose(1, 2)
            start = j
    rows = torch.cat([torch.arange(r, device=device) for r in reach])
    cols = torch.arange(len(reach), device=device).repeat_interleave(torch.tensor(reach, device=device))
    if not per_position:
        return table[0, rows, cols]
    pos = torch.arange(n_pos, device=device).repeat(len(rows))
    return table[pos, rows.repeat_interleave(n_pos), cols.repeat_interleave(n_pos)]
