"""Activation patching program: cache the runs, then evaluate chunks of patched rows.

Torch-only (see the package docstring): this module runs on the server too.
"""

import torch

from .common import (at, block, cache_pass, first, metric, point, read, rep, repeat_targets, skip_value, stop_for_gap,
                     unview, upcast, view, with_clean_logprobs, write)


def cache_runs(nn, arch, runs):
    """Run each cache pass of `runs` in order; returns the merged activation cache.

    Each pass is a dict: ``names`` (runs stacked along the batch), ``ids`` (``[run * prompt, pos]``),
    ``sites`` (``(site, layer)`` pairs) and optionally ``noise``: ``{"from": run, "start": pos,
    "eps": [prompt, n, d_model]}``, which starts the pass from run ``from``'s block-0 input
    with ``eps`` added at positions ``start .. start + n - 1`` (causal tracing's corruption).
    """
    acts = {}
    for run in runs:
        embeds = None
        noise = run.get("noise")
        if noise is not None:
            embeds = acts[(noise["from"], "resid_pre", 0)].clone()
            stop = noise["start"] + noise["eps"].shape[1]
            embeds[:, noise["start"]:stop] += noise["eps"].to(embeds.device, embeds.dtype)
        acts.update(cache_pass(nn, arch, run["ids"], run["names"], run["sites"], embeds))
    return acts


def patch_chunk(nn, arch, ids, n_rows, start, acts, base, source, writes, base_embeds=False):
    """One forward pass of `n_rows` copies of the base run (``ids``: ``[prompt, pos]``), row r
    patched as its masks say. Returns the final position's logits, ``[row * prompt, vocab]``.

    Args:
        start: blocks ``0..start-1`` are skipped, fed the base run's residual stream.
        acts: the cache (`cache_runs`); `base` and `source` name runs in it.
        writes: ``[(point, [(site, mask, layer), ...]), ...]`` in forward order; ``mask``
            (``[row * prompt, pos(, head)]`` bool) selects what takes the source value of
            ``(source, site, layer)``. A point with no entries is only read (the block input,
            which resid_mid patches need).
        base_embeds: the base run starts from its cached block-0 input, not its tokens'.
    """
    batch = ids.repeat(n_rows, 1)
    skip = skip_value(arch, rep(acts[(base, "resid_pre", start)], n_rows)) if start else None
    embed_point = point(arch, "resid_pre", 0)
    if base_embeds and start == 0 and all(pt != embed_point for pt, _ in writes):
        writes = [(embed_point, [])] + list(writes)
    with torch.no_grad(), nn.trace(batch, logits_to_keep=1):
        for layer in range(start):
            block(nn, arch, layer).skip(skip)
        resid_pre = None
        for pt, entries in writes:
            envoy = at(nn, arch, pt)
            value = read(envoy, pt[2])
            raw = first(value)
            new = raw
            if base_embeds and pt == embed_point:
                new = rep(acts[(base, "resid_pre", 0)], n_rows).to(raw.device)
            for site, mask, layer in entries:
                src = rep(acts[(source, site, layer)], n_rows).to(raw.device)
                mask = mask.to(raw.device)[..., None]
                if site == "resid_mid":
                    current = resid_pre + new
                    new = new + torch.where(mask, src - current, torch.zeros_like(new))
                else:
                    seen = view(arch, site, new)
                    new = unview(arch, site, new, torch.where(mask, src, seen))
            write(envoy, pt[2], value, new)
            if pt[2] == "input" and pt[1] == "":
                resid_pre = new
        logits = nn.output.logits[:, -1].clone()
    return logits


def patch_program(nn, spec, progress=None):
    """Cache the runs, then evaluate every chunk's metric. One session, one request remotely.

    `spec`: ``arch``, ``runs`` (see `cache_runs`), ``base``/``source`` run names, ``base_ids``
    (``[prompt, pos]``), ``base_embeds``, ``metric`` (name), ``targets`` (``correct``,
    ``incorrect``: ``[prompt]``), ``kl_from`` (run whose logits are the KL reference) and
    ``chunks``: ``[{"start", "n_rows", "writes"}]``. ``gap`` (optional): two run
    names; when their metrics leave no gap to normalise by (`stop_for_gap`), the program returns
    before its chunks, with ``values`` empty.

    Returns ``{"values": [[row * prompt] per chunk], "runs": {run: metric [prompt]}}``.
    """
    arch = spec["arch"]
    acts = cache_runs(nn, arch, spec["runs"])
    targets = with_clean_logprobs(spec["targets"], acts[(spec["kl_from"], "logits")])
    runs = {key[0]: metric(spec["metric"], logits, targets)
            for key, logits in acts.items() if key[1] == "logits"}
    if stop_for_gap(spec, runs):
        return {"values": [], "runs": runs}
    values = []
    for chunk in spec["chunks"]:
        logits = patch_chunk(nn, arch, spec["base_ids"], chunk["n_rows"], chunk["start"], acts, spec["base"],
                             spec["source"], chunk["writes"], spec["base_embeds"])
        values.append(metric(spec["metric"], logits, repeat_targets(targets, chunk["n_rows"])))
        if progress is not None:
            progress(1)
    return {"values": values, "runs": runs}


def answer_program(nn, arch, prompts, answers):
    """Each prompt (``[1, pos]``, run alone: no padding) and its answer token: the answer's
    softmax probability and the top-1 token at the last position, ``[prompt]`` each."""
    probs, top = [], []
    for i, ids in enumerate(prompts):
        logits = upcast(cache_pass(nn, arch, ids, (i,), ())[(i, "logits")][0])
        probs.append(logits.softmax(-1)[answers[i]])
        top.append(logits.argmax())
    return {"prob": torch.stack(probs), "top": torch.stack(top)}
