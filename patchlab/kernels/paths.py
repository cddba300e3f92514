"""Path patching program (Wang et al. 2022, arXiv 2211.00593): record the receivers' inputs, replay them.

Torch-only (see the package docstring): this module runs on the server too.

A *receiver* is a tuple ``(site, layer, head)``:

- ``("q" | "k" | "v", layer, head)``: one (key/value) head's slice of that projection's output;
- ``("mlp_in", layer, None)``: the residual stream the MLP of `layer` reads;
- ``("logits", n_layers, None)``: the final residual stream (the final norm's input).

Recorded inputs are dicts ``{receiver: tensor}``, ``[row * prompt, pos, d_head]`` for head
slices and ``[row * prompt, pos, d_model]`` otherwise.
"""

import torch

from .common import (at, block, cleared_block_input, metric, mlp_in_point, module, padding, point, rep,
                     repeat_targets, skip_value, stop_for_gap, unview, view, with_clean_logprobs)
from .patching import cache_runs


def _heads_by_point(arch, receivers, layer):
    """The head receivers of `layer` grouped by hook point: ``{point: [receiver, ...]}``."""
    points = {}
    for r in receivers:
        if r[1] == layer and r[0] in ("q", "k", "v"):
            points.setdefault(point(arch, r[0], layer), []).append(r)
    return points


def _patched(arch, raw, receivers, recorded):
    """`raw` projection output with each receiver head's slice replaced by its recorded input."""
    new = raw
    for r in receivers:
        heads = view(arch, r[0], new).clone()
        heads[:, :, r[2]] = recorded[r].to(heads.device)
        new = unview(arch, r[0], new, heads)
    return new


def _skip(nn, arch, acts, base, n_rows, layers, entering):
    """Skip the blocks `layers`, fed the base run's residual stream entering block `entering`."""
    if layers:
        value = skip_value(arch, rep(acts[(base, "resid_pre", entering)], n_rows))
        for layer in layers:
            block(nn, arch, layer).skip(value)


def record(nn, arch, ids, acts, base, n_rows, start, receivers, freeze_mlps, senders=None, previous=None,
           live=None, mask=None):
    """One recording pass over `n_rows` copies of the base run (``ids``: ``[prompt, pos]``); returns the
    `receivers`' inputs ``{receiver: tensor}``.

    Every head output is frozen to its base value except: with `senders` = ``(source, heads, mlps)``
    (hop 1), rows' sender heads (``heads``: ``[row * prompt, layer, head]`` bool) and MLPs (``mlps``:
    ``[row * prompt, layer]`` bool) take run `source`'s values; with `previous` (later hops), those
    recorded inputs are patched in and the heads of ``live`` (``[layer, head]`` bool) compute their
    outputs from them. MLPs are recomputed, or frozen to the base run with `freeze_mlps`. Blocks
    before `start` and after the last receiver are skipped. `mask` (``[prompt, pos]``, True on real
    tokens) marks left padding: the pass gets its attention mask and position ids, and every block
    input is cleared there.
    """
    n_layers = arch["n_layers"]
    previous = previous or {}
    last = max(r[1] for r in receivers)
    store = {}
    real = None if mask is None else mask.repeat(n_rows, 1)
    with torch.no_grad(), nn.trace(ids.repeat(n_rows, 1), logits_to_keep=1, **padding(real)):
        _skip(nn, arch, acts, base, n_rows, range(start), start)
        for layer in range(start, min(last + 1, n_layers)):
            cleared_block_input(nn, arch, layer, real)
            patches, reads = _heads_by_point(arch, previous, layer), _heads_by_point(arch, receivers, layer)
            for pt in sorted(set(patches) | set(reads), key=lambda p: p[3]):
                envoy = at(nn, arch, pt)
                raw = envoy.output
                if pt in patches:
                    raw = _patched(arch, raw, patches[pt], previous)
                    envoy.output = raw
                for r in reads.get(pt, ()):
                    store[r] = view(arch, r[0], raw)[:, :, r[2]].clone()
            _freeze_heads(nn, arch, acts, base, n_rows, layer, senders, live)
            if ("mlp_in", layer, None) in receivers:
                store[("mlp_in", layer, None)] = at(nn, arch, mlp_in_point(arch, layer)).input.clone()
            _set_mlp(nn, arch, acts, base, n_rows, layer, senders, freeze_mlps)
        _skip(nn, arch, acts, base, n_rows, range(last + 1, n_layers), last + 1)  # nothing after `last` is read
        if last >= n_layers:
            store[("logits", n_layers, None)] = module(nn, arch["final_norm"]).input.clone()
    return store


def _freeze_heads(nn, arch, acts, base, n_rows, layer, senders, live):
    """Head outputs of `layer`: the base run's, the source run's for senders, computed for live heads."""
    o_proj = at(nn, arch, point(arch, "head", layer))
    device = o_proj.input.device
    z = rep(acts[(base, "head", layer)], n_rows).to(device)
    if live is not None and live[layer].any():
        z = torch.where(live[layer, None, None, :, None].to(device), view(arch, "head", o_proj.input), z)
    if senders is not None:
        source, heads, _ = senders
        z = torch.where(heads[:, layer, None, :, None].to(device),
                        rep(acts[(source, "head", layer)], n_rows).to(device), z)
    o_proj.input = z.reshape(o_proj.input.shape)


def _set_mlp(nn, arch, acts, base, n_rows, layer, senders, freeze_mlps):
    """MLP output of `layer`: the source run's for sender rows, else the base run's (`freeze_mlps`) or computed."""
    is_sender = senders is not None and bool(senders[2][:, layer].any())
    if not (freeze_mlps or is_sender):
        return
    mlp = at(nn, arch, point(arch, "mlp_out", layer))
    other = rep(acts[(base, "mlp_out", layer)], n_rows).to(mlp.output.device) if freeze_mlps else mlp.output
    if senders is None:
        mlp.output = other
        return
    source, _, mlps = senders
    mlp.output = torch.where(mlps[:, layer, None, None].to(other.device),
                             rep(acts[(source, "mlp_out", layer)], n_rows).to(other.device), other)


def replay(nn, arch, ids, acts, base, n_rows, start, recorded, mask=None):
    """Pass 2: `n_rows` copies of the base run with only the `recorded` receiver inputs patched in,
    blocks before `start` skipped (`mask`: as in `record`). Returns the final position's logits,
    ``[row * prompt, vocab]``."""
    n_layers = arch["n_layers"]
    final = ("logits", n_layers, None)
    real = None if mask is None else mask.repeat(n_rows, 1)
    with torch.no_grad(), nn.trace(ids.repeat(n_rows, 1), logits_to_keep=1, **padding(real)):
        _skip(nn, arch, acts, base, n_rows, range(min(start, n_layers)), min(start, n_layers - 1))
        for layer in range(start, n_layers):
            cleared_block_input(nn, arch, layer, real)
            patches = _heads_by_point(arch, recorded, layer)
            for pt in sorted(patches, key=lambda p: p[3]):
                envoy = at(nn, arch, pt)
                envoy.output = _patched(arch, envoy.output, patches[pt], recorded)
            if ("mlp_in", layer, None) in recorded:
                at(nn, arch, mlp_in_point(arch, layer)).input = recorded[("mlp_in", layer, None)]
        if final in recorded:
            module(nn, arch["final_norm"]).input = recorded[final]
        logits = nn.output.logits[:, -1].clone()
    return logits


def path_chunk(nn, spec, acts, chunk):
    """Pass 1 (and the hops) once for a chunk of rows, then pass 2 per receiver set.
    Returns each set's final-position logits, ``[set][row * prompt, vocab]``."""
    arch, ids, base, n_rows = spec["arch"], spec["base_ids"], spec["base"], chunk["n_rows"]
    mask = (spec.get("masks") or {}).get(base)
    first, *hops = spec["stages"]
    recorded = record(nn, arch, ids, acts, base, n_rows, chunk["start"], first["receivers"], spec["freeze_mlps"],
                      senders=(spec["source"], chunk["heads"], chunk["mlps"]), mask=mask)
    for hop in hops:
        recorded = record(nn, arch, ids, acts, base, n_rows, hop["start"], hop["receivers"], spec["freeze_mlps"],
                          previous=recorded, live=hop["live"], mask=mask)
    return [replay(nn, arch, ids, acts, base, n_rows, rs["start"], {r: recorded[r] for r in rs["receivers"]}, mask)
            for rs in spec["receiver_sets"]]


def path_program(nn, spec, progress=None, acts=None):
    """Cache the runs (unless `acts` is given), then path-patch every chunk of rows into every
    receiver set. One session, one request remotely.

    `spec`: ``arch``, ``runs`` (see `patchlab.kernels.patching.cache_runs`), ``base``/``source``
    run names, ``base_ids`` (``[prompt, pos]``), ``metric`` (name), ``targets`` (``correct``,
    ``incorrect``: ``[prompt]``), ``kl_from`` (run whose logits are the KL reference),
    ``masks`` (``{run: [prompt, pos]}``, True on real tokens of left-padded prompts, or None),
    ``freeze_mlps``, ``stages`` (pass 1 then each hop: ``{"receivers", "start", "live"}``; the last
    stage's receivers are those of every set; hop ``start``/``live`` as in `record`),
    ``receiver_sets`` (``[{"receivers", "start"}]``) and ``chunks`` (``[{"n_rows", "start",
    "heads", "mlps"}]``, the senders as in `record`). ``gap`` (optional): two run
    names; when their metrics leave no gap to normalise by (`stop_for_gap`), the program returns
    before its chunks, with ``values`` empty. `acts`: the runs' cache, when already computed.

    Returns ``{"values": [[set, row * prompt] per chunk], "runs": {run: metric [prompt]}}``.
    """
    if acts is None:
        acts = cache_runs(nn, spec["arch"], spec["runs"])
    targets = with_clean_logprobs(spec["targets"], acts[(spec["kl_from"], "logits")])
    runs = {key[0]: metric(spec["metric"], logits, targets) for key, logits in acts.items() if key[1] == "logits"}
    if stop_for_gap(spec, runs):
        return {"values": [], "runs": runs}
    values = []
    for chunk in spec["chunks"]:
        repeated = repeat_targets(targets, chunk["n_rows"])
        values.append(torch.stack([metric(spec["metric"], logits, repeated)
                                   for logits in path_chunk(nn, spec, acts, chunk)]))
        if progress is not None:
            progress(1)
    return {"values": values, "runs": runs}
