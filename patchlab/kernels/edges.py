"""Edge patching program: cache the runs, then evaluate chunks of rows with patched edge sets.

Torch-only (see the package docstring): this module runs on the server too. Edge
patching and its complement form are defined in `patchlab.graph_runner`, which
plans the chunks on the client.

A chunk patches, per receiver channel, a plain dict (a *key*): ``kind`` ("head",
"kv_head", "mlp", "logits"), ``layer``, ``head`` (None where there is none), ``site``
("q", "k", "v", "in") and its coefficients per row of the chunk (row r stands for
batch rows ``r * prompt .. r * prompt + prompt - 1``):

- ``flip`` ``[row, 1, 1]`` float: 1 where the row reads the source residual (complement form);
- ``full`` / ``partial`` ``[row]`` bool: every incoming edge patched at every position / some;
- ``embed`` ``[row, pos, 1]`` or None, ``heads`` ``{layer: [row, pos, head]}``, ``mlps``
  ``{layer: [row, pos, 1]}``: coefficients of the sender differences
  ``out_s(source) - out_s(current)`` (+1 patched; -1 unpatched in complement form).
"""

import torch

from .common import (at, block, cleared_block_input, head_contributions, head_weights, input_head_weights, metric,
                     mlp_in_point, module, padding, point, rep, repeat_targets, skip_value, stop_for_gap, torch_module,
                     unview, view, with_clean_logprobs)
from .patching import cache_runs, real_mean

HEAD_KINDS = ("head", "kv_head")


def mean_run(acts, run, name, mask=None):
    """Run `name`: every activation of `run` replaced by its mean over prompts (per position; over
    real tokens only when `mask`, ``[prompt, pos]``, marks left padding)."""
    return {(name,) + key[1:]: real_mean(value, mask).expand_as(value).contiguous()
            for key, value in acts.items() if key[0] == run and key[1] != "logits"}


def source_values(nn, arch, acts, run):
    """Run `run`'s sender values (head outputs z where the output projection is linear in
    them, else the per-head contributions: Gemma's post-norm) and the residual stream each
    receiver kind reads, ``[prompt, ...]``."""
    n = arch["n_layers"]
    heads = {layer: acts[(run, "head", layer)] for layer in range(n)}
    if arch["post_norms"]:
        heads = {layer: head_contributions(nn, arch, layer, z) for layer, z in heads.items()}
    mid = "resid_mid" if arch["has_resid_mid"] else "resid_pre"
    return {"embed": acts[(run, "resid_pre", 0)], "heads": heads,
            "mlps": {layer: acts[(run, "mlp_out", layer)] for layer in range(n)},
            "resid_pre": {layer: acts[(run, "resid_pre", layer)] for layer in range(n)},
            "resid_mlp": {layer: acts[(run, mid, layer)] for layer in range(n)},
            "resid_final": acts[(run, "resid_post", n - 1)]}


def _expand(key, n_prompts, like):
    """A key with its per-row tensors repeated per prompt (``[row * prompt, ...]``) on the device
    of `like`, coefficients in its dtype (the model's: they multiply its activations)."""
    rows = lambda t, dtype=None: None if t is None else \
        t.to(like.device, dtype or t.dtype).repeat_interleave(n_prompts, dim=0)
    coef = lambda t: rows(t, like.dtype)
    return {**key, "flip": coef(key["flip"]), "full": rows(key["full"]), "partial": rows(key["partial"]),
            "embed": coef(key["embed"]), "heads": {layer: coef(t) for layer, t in key["heads"].items()},
            "mlps": {layer: coef(t) for layer, t in key["mlps"].items()}}


def _add(delta, i, term):
    """Accumulate receiver `i`'s correction term."""
    delta[i] = term if i not in delta else delta[i].to(term.device) + term


def _patched_input(current, source_resid, key, delta, real=None):
    """What a receiver channel reads: its own residual plus the patched edges' differences,
    or (complement form) the source residual minus the unpatched edges' differences. Padding
    (`real` False, ``[batch, pos]``) keeps `current`: it is never patched."""
    out = current + key["flip"].to(current.device) * (source_resid - current)
    out = out if delta is None else out + delta.to(out.device)
    return out if real is None else torch.where(real.to(out.device)[..., None], out, current)


def patch_chunk(nn, arch, ids, chunk, acts, base, src, mask=None):
    """One forward pass of ``chunk["n_rows"]`` copies of the base run (``ids``: ``[prompt, pos]``),
    each row with its edges patched from the source values `src` (`source_values`).

    Blocks ``0..chunk["start"]-1`` are skipped, fed the base run's residual stream from `acts`.
    `mask` (``[prompt, pos]``, True on real tokens) marks left padding: the pass gets its attention
    mask and position ids, every block input is cleared there (`clear_padding`), and no receiver
    input is patched there. Returns the final position's logits, ``[row * prompt, vocab]``.
    """
    n_rows, start = chunk["n_rows"], chunk["start"]
    resid_start = acts[(base, "resid_pre", start)]
    keys = [_expand(key, ids.shape[0], resid_start) for key in chunk["keys"]]
    tiled = lambda t, like: rep(t, n_rows).to(like.device)
    skip = skip_value(arch, rep(resid_start, n_rows)) if start else None
    head_receivers = {}  # layer -> indices of head receiver keys
    for i, key in enumerate(keys):
        if key["kind"] in HEAD_KINDS:
            head_receivers.setdefault(key["layer"], []).append(i)
    mlp_receiver = {key["layer"]: i for i, key in enumerate(keys) if key["kind"] == "mlp"}
    logits_receiver = next((i for i, key in enumerate(keys) if key["kind"] == "logits"), None)
    head_layers = {layer for key in keys for layer in key["heads"]}
    mlp_layers = {layer for key in keys for layer in key["mlps"]}
    delta = {}  # key index -> correction, [row * prompt, pos, d_model]
    real = None if mask is None else mask.repeat(n_rows, 1)
    with torch.no_grad(), nn.trace(ids.repeat(n_rows, 1), logits_to_keep=1, **padding(real)):
        for layer in range(start):
            block(nn, arch, layer).skip(skip)
        for layer in range(start, arch["n_layers"]):
            resid = cleared_block_input(nn, arch, layer, real)
            if layer == 0:
                for i, key in enumerate(keys):
                    if key["embed"] is not None:
                        _add(delta, i, key["embed"].to(resid.device) * (tiled(src["embed"], resid) - resid))
            if layer in head_receivers:
                _patch_head_inputs(nn, arch, layer, resid, tiled(src["resid_pre"][layer], resid),
                                   head_receivers[layer], keys, delta, real)
            if layer in head_layers:
                _add_head_terms(nn, arch, layer, tiled(src["heads"][layer], resid), keys, delta)
            if layer in mlp_receiver:
                i = mlp_receiver[layer]
                norm = at(nn, arch, mlp_in_point(arch, layer))
                current = norm.input
                norm.input = _patched_input(current, tiled(src["resid_mlp"][layer], current), keys[i], delta.get(i),
                                            real)
            if layer in mlp_layers:
                out = at(nn, arch, point(arch, "mlp_out", layer)).output
                diff = tiled(src["mlps"][layer], out) - out
                for i, key in enumerate(keys):
                    if layer in key["mlps"]:
                        _add(delta, i, key["mlps"][layer].to(diff.device) * diff)
        if logits_receiver is not None:
            final = module(nn, arch["final_norm"])
            current = final.input
            final.input = _patched_input(current, tiled(src["resid_final"], current), keys[logits_receiver],
                                         delta.get(logits_receiver), real)
        logits = nn.output.logits[:, -1].clone()
    return logits


HEAD_TERM_ELEMENTS = 2**24
"""Most per-head sender differences, ``[batch, pos, head, d_model]``, held at once by `_add_head_terms`."""


def _add_head_terms(nn, arch, layer, source_heads, keys, delta):
    """Add ``sum_h c_h (out_h(source) - out_h(current))`` of `layer`'s heads to each key's
    correction. One receiver: one matmul through the output projection, linear in z. Several:
    each head's difference is projected once (``[batch, pos, head, d_model]``, in batch slabs of
    at most `HEAD_TERM_ELEMENTS`) and weighed per receiver, instead of a projection per receiver."""
    users = [i for i, key in enumerate(keys) if layer in key["heads"]]
    if not users:
        return
    z = view(arch, "head", at(nn, arch, point(arch, "head", layer)).input)
    if not arch["post_norms"] and len(users) == 1:
        i = users[0]
        diff, w = source_heads - z, head_weights(nn, arch, layer).flatten(0, 1)
        _add(delta, i, (diff * keys[i]["heads"][layer].to(diff.device)[..., None]).flatten(2) @ w)
        return
    if arch["post_norms"]:  # the sources are per-head contributions already
        project = lambda rows: source_heads[rows] - head_contributions(nn, arch, layer, z[rows])
    else:  # linear in z: project the difference
        project = lambda rows: head_contributions(nn, arch, layer, source_heads[rows] - z[rows])
    coefs = torch.stack([keys[i]["heads"][layer].to(z.device) for i in users])  # [receiver, batch, pos, head]
    batch, n_pos, n_heads = coefs.shape[1:]
    step = max(1, HEAD_TERM_ELEMENTS // (n_pos * n_heads * arch["d_model"]))
    terms = torch.cat([torch.einsum("bthd,kbth->kbtd", project(slice(b, b + step)), coefs[:, b:b + step])
                       for b in range(0, batch, step)], dim=1)
    for i, term in zip(users, terms):
        _add(delta, i, term)


def _patch_head_inputs(nn, arch, layer, resid, source_resid, receivers, keys, delta, real=None):
    """Recompute the q/k/v slice of each receiver head (indices `receivers` into `keys`) from its
    own patched residual (all partially patched channels of a projection in one batched norm
    and matmul); fully patched heads take the slice of the source projection."""
    norm = torch_module(module(block(nn, arch, layer), arch["attn_norm"]))
    # type(m).forward(m, x) calls the module without nnsight's hooks: a side computation.
    normed = lambda x: type(norm).forward(norm, x)
    by_point = {}
    for i in receivers:
        by_point.setdefault(point(arch, keys[i]["site"], layer), []).append(i)
    for pt in sorted(by_point, key=lambda p: p[3]):
        envoy = at(nn, arch, pt)
        new = envoy.output
        by_site = {}
        for i in by_point[pt]:
            by_site.setdefault(keys[i]["site"], []).append(i)
        for site, group in by_site.items():
            weight, bias = input_head_weights(nn, arch, site, layer)  # [d, head, d_head], [head, d_head]
            sliced = view(arch, site, new).clone()
            full = [i for i in group if keys[i]["full"].any()]
            if full:
                source = torch.einsum("bpd,dhe->bphe", normed(source_resid), weight) + bias
                for i in full:
                    h = keys[i]["head"]
                    take = keys[i]["full"][:, None, None] if real is None else \
                        keys[i]["full"][:, None, None] & real.to(source.device)[..., None]
                    sliced[:, :, h] = torch.where(take, source[:, :, h], sliced[:, :, h])
            partial = [i for i in group if keys[i]["partial"].any()]
            if partial:
                x = torch.stack([_patched_input(resid, source_resid, keys[i], delta.get(i), real) for i in partial])
                heads = [keys[i]["head"] for i in partial]
                recomputed = torch.einsum("kbpd,kde->kbpe", normed(x), weight[:, heads].transpose(0, 1)) \
                    + bias[heads][:, None, None, :]
                for i, value in zip(partial, recomputed):
                    h = keys[i]["head"]
                    sliced[:, :, h] = torch.where(keys[i]["partial"][:, None, None], value, sliced[:, :, h])
            new = unview(arch, site, new, sliced)
        envoy.output = new


def edge_program(nn, spec, acts=None, progress=None):
    """Cache the runs (unless `acts` is given), then evaluate every chunk's metric. One
    session; one request remotely.

    `spec`: ``arch``, ``runs`` (cache passes, see `patchlab.kernels.patching.cache_runs`),
    ``base``/``source`` run names, ``ablation`` ("resample": the source run itself; "mean":
    its mean over prompts per position), ``base_ids`` (``[prompt, pos]``), ``metric`` (name),
    ``targets`` (``correct``, ``incorrect``: ``[prompt]``), ``kl_from`` (run whose logits are
    the KL reference), ``masks`` (``{run: [prompt, pos]}``, True on real tokens of left-padded
    prompts, or None) and ``chunks``: ``[{"start", "n_rows", "keys"}]`` (see the module docstring).
    ``gap`` (optional): two run names; when their metrics leave no gap to normalise by
    (`stop_for_gap`), the program returns before its chunks, with ``values`` empty.
    `acts`: a cache of the same runs made earlier (`cache_runs`), to skip caching.

    Returns ``{"values": [[row * prompt] per chunk], "runs": {run: metric [prompt]}}``.
    """
    arch = spec["arch"]
    if acts is None:
        acts = cache_runs(nn, arch, spec["runs"])
    source = spec["source"]
    masks = spec.get("masks") or {}
    if spec["ablation"] == "mean":
        acts = {**acts, **mean_run(acts, source, "mean", masks.get(source))}
        source = "mean"
    src = source_values(nn, arch, acts, source)
    targets = with_clean_logprobs(spec["targets"], acts[(spec["kl_from"], "logits")])
    runs = {key[0]: metric(spec["metric"], logits, targets)
            for key, logits in acts.items() if key[1] == "logits"}
    if stop_for_gap(spec, runs):
        return {"values": [], "runs": runs}
    values = []
    for chunk in spec["chunks"]:
        logits = patch_chunk(nn, arch, spec["base_ids"], chunk, acts, spec["base"], src, masks.get(spec["base"]))
        values.append(metric(spec["metric"], logits, repeat_targets(targets, chunk["n_rows"])))
        if progress is not None:
            progress(1)
    return {"values": values, "runs": runs}
