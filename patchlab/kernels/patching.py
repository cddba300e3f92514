"""Activation patching program: cache the runs, then evaluate chunks of patched rows.

Torch-only (see the package docstring): this module runs on the server too.
"""

import torch

from .common import (at, block, cache_pass, clear_padding, first, hidden_metric, metric, module, padding, point, read,
                     rep, skip_value, stop_for_gap, torch_module, unview, upcast, view, with_clean_logprobs, write)


def cache_runs(nn, arch, runs):
    """Run each cache pass of `runs` in order; returns the merged activation cache.

    Each pass is a dict: ``names`` (runs stacked along the batch), ``ids`` (``[run * prompt, pos]``),
    ``sites`` (``(site, layer)`` pairs), optionally ``mask`` (``[run * prompt, pos]``, True on real
    tokens of left-padded prompts) and ``noise``: ``{"from": run, "start": pos,
    "eps": [prompt, n, d_model]}``, which starts the pass from run ``from``'s block-0 input
    with ``eps`` added at positions ``start .. start + n - 1`` (causal tracing's corruption), and
    ``kv`` (a KV-cache class, or None): also keep each run's keys and values at every layer
    (`cache_pass`), which passes that compute later positions only attend to (`patch_chunk`).
    """
    acts = {}
    for run in runs:
        embeds = None
        noise = run.get("noise")
        if noise is not None:
            embeds = acts[(noise["from"], "resid_pre", 0)].clone()
            stop = noise["start"] + noise["eps"].shape[1]
            embeds[:, noise["start"]:stop] += noise["eps"].to(embeds.device, embeds.dtype)
        acts.update(cache_pass(nn, arch, run["ids"], run["names"], run["sites"], embeds, run.get("mask"),
                               run.get("kv")))
    return acts


def patch_chunk(nn, arch, ids, n_rows, start, acts, base, writes, base_embeds=False, mask=None, masks=None,
                groups=None, col=0):
    """`n_rows` copies of the base run (``ids``: ``[prompt, pos]``), row r intervened on as its plan
    says: one forward pass per length group. Returns the final position's final-norm output (the
    unembedding's input, `final_logits`), ``[row * prompt, d_model]``.

    Args:
        start: blocks ``0..start-1`` are skipped, fed the base run's residual stream.
        acts: the cache (`cache_runs`); `base` names a run in it.
        writes: ``[(point, [(site, layer, ops), ...]), ...]`` in forward order (see `intervene`).
            A point with no entries is only read (the block input, which resid_mid needs; the
            values, which patterns weigh).
        base_embeds: the base run starts from its cached block-0 input, not its tokens'.
        mask: the base run's attention mask (``[prompt, pos]``, True on real tokens) for left-padded
            prompts, or None; `masks`: every run's, for means over real tokens only.
        groups: for left-padded prompts of different lengths, ``[(prompt indices, first column)]``:
            each group runs as its own pass over the columns from its first on (its padding to the
            longest prompt of the whole batch is not computed). None: one pass over everything.
        col: the first column any row changes. Under the causal mask the columns before it are the
            base run's in every layer, so the pass computes columns ``col..`` only and attends to the
            base run's cached keys and values before them (``acts[(base, "past_keys" | "past_values",
            layer)]``, `cache_pass` with ``kv``). 0: every column.
    """
    n_prompts = ids.shape[0]
    if not groups and not col:
        return _patch_pass(nn, arch, ids, n_rows, start, acts, base, writes, base_embeds, mask, masks, None)
    hidden = None
    for prompts, group_col in groups or [(torch.arange(n_prompts), 0)]:
        sel = (torch.arange(n_rows)[:, None] * n_prompts + prompts[None, :]).flatten()
        take = {"prompts": prompts, "sel": sel, "start": max(int(group_col), int(col)), "keys": int(group_col),
                "n_batch": n_rows * n_prompts}
        part = _patch_pass(nn, arch, ids[prompts], n_rows, start, acts, base, taken_writes(writes, take),
                           base_embeds, None if mask is None else mask[prompts], masks, take)
        if hidden is None:
            hidden = part.new_empty((n_rows * n_prompts,) + tuple(part.shape[1:]))
        hidden[sel.to(part.device)] = part
    return hidden


def taken_writes(writes, take):
    """`writes` restricted to one length group's batch rows and columns (`patch_chunk`)."""
    sel, col = take["sel"], take["start"]
    cut = lambda t: None if t is None else t[sel.to(t.device)][:, col:]  # noqa: E731
    local = torch.full((take["n_batch"],), -1, dtype=torch.long)  # whole-batch row -> this group's row
    local[sel] = torch.arange(len(sel))
    out = []
    for pt, entries in writes:
        kept = []
        for site, layer, ops in entries:
            at_fns = []
            for fn, batch, head, pos in ops["at"]:
                mine = local[batch]
                if bool((mine >= 0).any()):
                    at_fns.append((fn, mine[mine >= 0], head, pos - col))
            kept.append((site, layer, {
                "set": [(cut(m), src if src[0] == "zero" else src[:3] + (cut(src[3]),)) for m, src in ops["set"]],
                "proj": [(cut(w), r) for w, r in ops.get("proj", ())], "mul": cut(ops["mul"]),
                "add": [(cut(c), v) for c, v in ops["add"]], "at": at_fns}))
        out.append((pt, kept))
    return out


def _base_rows(acts, key, n_rows, take):
    """The base run's cached `key` for this pass's batch: ``[row * prompt, ...]`` (one group's prompts
    and columns when `take` says so)."""
    cached = acts[key]
    if take is not None:
        cached = cached[take["prompts"].to(cached.device)][:, take["start"]:]
    return rep(cached, n_rows)


def _patch_pass(nn, arch, ids, n_rows, start, acts, base, writes, base_embeds, mask, masks, take):
    """One forward pass of `patch_chunk`: with `take`, over its prompts' columns from ``take["start"]``
    on, attending to the cached keys and values of the columns ``take["keys"]..take["start"] - 1``."""
    cols = 0 if take is None else take["start"]
    keys = 0 if take is None else take["keys"]
    batch = ids[:, cols:].repeat(n_rows, 1)
    skip = skip_value(arch, _base_rows(acts, (base, "resid_pre", start), n_rows, take)) if start else None
    kwargs = {}
    if mask is not None:  # over every key column: the cached ones and this pass's
        kwargs = padding(mask[:, keys:].repeat(n_rows, 1))
        kwargs["position_ids"] = kwargs["position_ids"][:, cols - keys:]
        mask = mask[:, cols:].repeat(n_rows, 1)
    if cols > keys:
        kwargs.update(cache=past_cache(arch, acts, base, n_rows, take), use_cache=True)
        if mask is None:  # nnsight would add a mask over this pass's columns only
            kwargs.update(attention_mask=torch.ones(batch.shape[0], ids.shape[1] - keys, dtype=torch.long,
                                                    device=ids.device),
                          position_ids=torch.arange(cols, ids.shape[1], device=ids.device)[None])
    writes = planned_writes(arch, writes, start, mask, base_embeds)
    with torch.no_grad(), nn.trace(batch, logits_to_keep=1, **kwargs):
        for layer in range(start):
            block(nn, arch, layer).skip(skip)
        apply_writes(nn, arch, writes, n_rows, acts, base, base_embeds, mask, masks, take)
        unembed = module(nn, arch["unembed"])
        hidden = unembed.input[:, -1].clone()
        unembed.skip(hidden.new_zeros(hidden.shape[0], 1, 1))  # `final_logits`, after many passes
    return hidden


def past_cache(arch, acts, base, n_rows, take):
    """A KV cache holding `n_rows` copies of the base run's keys and values (`cache_pass` with ``kv``)
    at the columns ``take["keys"]..take["start"] - 1`` of ``take["prompts"]``, at every layer."""
    cache = acts["kv_class"]()  # transformers' DynamicCache: its layers are made by `update`
    lo, hi = take["keys"], take["start"]
    for layer in range(arch["n_layers"]):
        kv = [acts[(base, name, layer)] for name in ("past_keys", "past_values")]
        kv = [rep(t[take["prompts"].to(t.device), :, lo:hi], n_rows) for t in kv]
        cache.update(kv[0], kv[1], layer)
    return cache


def planned_writes(arch, writes, start, mask, base_embeds=False):
    """`writes` plus the points a pass must visit without intervening: block 0's input when the
    base run starts from cached embeddings, and with left padding (`mask`) every block input from
    `start` on, where `apply_writes` clears the padding."""
    embed_point = point(arch, "resid_pre", 0)
    if base_embeds and start == 0 and all(pt != embed_point for pt, _ in writes):
        writes = [(embed_point, [])] + list(writes)
    if mask is not None:
        planned = dict(writes)
        for layer in range(start, arch["n_layers"]):
            planned.setdefault(point(arch, "resid_pre", layer), [])
        writes = sorted(planned.items(), key=lambda kv: (kv[0][0], kv[0][3]))
    return writes


def apply_writes(nn, arch, writes, n_rows, acts, base, base_embeds=False, mask=None, masks=None, take=None):
    """Inside a trace: visit each point of `writes` in forward order, apply its interventions
    (`intervene`) and write the result back. With `base_embeds` block 0's input is the base run's
    cached one; with `mask` (left padding, ``[batch, pos]``) padding is cleared at block inputs."""
    embed_point = point(arch, "resid_pre", 0)
    state = {"masks": masks, "take": take}  # the current values later interventions read (block input, v)
    for pt, entries in writes:
        envoy = at(nn, arch, pt)
        value = read(envoy, pt[2])
        raw = first(value)
        new = raw
        if base_embeds and pt == embed_point:
            new = _base_rows(acts, (base, "resid_pre", 0), n_rows, take).to(raw.device)
        if mask is not None and pt[1] == "" and pt[2] == "input":
            new = clear_padding(new, mask)
        for site, layer, ops in entries:
            new = intervene(arch, site, layer, new, state, ops, acts, n_rows)
        write(envoy, pt[2], value, new)
        if pt == point(arch, "resid_pre", pt[0]):
            state["resid_pre"] = new
        if pt == point(arch, "v", pt[0]):
            state["v"] = view(arch, "v", new)


def intervene(arch, site, layer, new, state, ops, acts, n_rows):
    """The module value `new` with `site`'s interventions applied (the one write path of node-level work).

    `ops` (over the batch ``[row * prompt, pos(, head)]``), applied in this order:

    - ``set``: ``[(mask, source)]``: masked elements take the source's value (`source_value`:
      a cached run, its mean over prompts, or zeros);
    - ``proj``: ``[(where, unit direction r)]``: where 1, ``x - (x . r) r`` (one direction after another);
    - ``mul``: factors (or None): the value is multiplied;
    - ``add``: ``[(coefficients, vector)]``: ``coefficient * vector`` is added;
    - ``at``: ``[(fn, batch index, head, pos index)]``: ``fn`` edits those elements last.

    resid_mid (the block input, ``state["resid_pre"]``, plus the attention branch) is written
    through the branch: ``new + (target - current)`` leaves untouched elements exactly as they
    were. A pattern is written through the head outputs it weighs (`weighed_heads`).
    """
    if site == "pattern":
        return unview(arch, "head", new, weighed_heads(arch, view(arch, "head", new), state, ops, acts, layer,
                                                       n_rows))
    current = state["resid_pre"] + new if site == "resid_mid" else view(arch, site, new)
    target = current
    for mask, src in ops["set"]:
        value = source_value(acts, src, site, layer, n_rows, current, state.get("masks"), state.get("take"))
        target = torch.where(mask.to(current.device)[..., None], value, target)
    for where, direction in ops.get("proj", ()):
        r = direction.to(current.device, current.dtype)
        target = target - (where.to(current.device, current.dtype) * (target @ r))[..., None] * r
    if ops["mul"] is not None:
        target = target * ops["mul"].to(current.device, current.dtype)[..., None]
    for coef, vector in ops["add"]:
        target = target + coef.to(current.device, current.dtype)[..., None] * vector.to(current.device, current.dtype)
    for fn, rows, head, pos in ops["at"]:
        target = call_at(fn, target, rows.to(current.device), head, pos.to(current.device))
    if site == "resid_mid":
        return new + (target - current)
    return unview(arch, site, new, target)


def weighed_heads(arch, z, state, ops, acts, layer, n_rows):
    """Head outputs `z` (``[batch, query, head, d_head]``) with pattern interventions applied: a head's
    output is its pattern times the values ``state["v"]`` (``[batch, key, kv_head, d_head]``, this pass's), so
    a set pattern gives ``pattern @ v``, a scaled one ``factor * z`` and an added key-position vector
    ``z + coefficient * (vector @ v)``; untouched elements keep `z` exactly."""
    group = arch["n_heads"] // arch["n_kv_heads"]
    v = state["v"]
    v = v.repeat_interleave(group, dim=2) if group > 1 else v  # [batch, key, head, d_head]
    target = z
    for mask, src in ops["set"]:
        if src[0] == "zero":
            value = torch.zeros_like(z)
        else:
            pattern = source_value(acts, src, "pattern", layer, n_rows, z, state.get("masks"), state.get("take"))
            value = torch.einsum("bqhk,bkhd->bqhd", pattern.to(v.dtype), v)
        target = torch.where(mask.to(z.device)[..., None], value, target)
    if ops["mul"] is not None:
        target = target * ops["mul"].to(z.device, z.dtype)[..., None]
    for coef, vector in ops["add"]:
        weighed = torch.einsum("k,bkhd->bhd", vector.to(v.device, v.dtype), v)[:, None]
        target = target + coef.to(z.device, z.dtype)[..., None] * weighed
    return target


def real_mean(cached, mask):
    """The mean of `cached` (``[prompt, pos, ...]``) over prompts at each position, over real tokens
    only when `mask` (``[prompt, pos]``) marks left padding (aligned from the end); ``[1, pos, ...]``."""
    if mask is None:
        return cached.mean(0, keepdim=True)
    real = mask.to(cached.device).reshape(mask.shape + (1,) * (cached.dim() - 2))
    total = torch.where(real, cached, torch.zeros((), dtype=cached.dtype, device=cached.device)).sum(0, keepdim=True)
    return total / real.sum(0, keepdim=True).clamp(min=1).to(cached.dtype)


def grouped_mean(cached, table):
    """Means of `cached` (``[prompt, pos, ...]``) over prompts, one per row of `table` (``[label, prompt]``:
    the column each prompt contributes, -1 for none); ``[1, label, ...]``."""
    table = table.to(cached.device)
    taken = table >= 0
    prompts = torch.arange(cached.shape[0], device=cached.device)
    picked = cached[prompts[None, :], table.clamp(min=0)]  # [label, prompt, ...]
    keep = taken.reshape(taken.shape + (1,) * (cached.dim() - 2))
    total = torch.where(keep, picked, torch.zeros((), dtype=cached.dtype, device=cached.device)).sum(1)
    return (total / keep.sum(1).clamp(min=1).to(cached.dtype))[None]


def source_value(acts, src, site, layer, n_rows, like, masks=None, take=None):
    """A setting intervention's values for the whole batch (``[row * prompt, ...]``, on `like`'s
    device; zeros shaped as `like`).

    `src`: ``("zero",)``; ``("run", name, perm, index)``: the cached run, its prompts reordered by
    `perm` (``[prompt]``, or None); ``("mean", name, table, index)``: its mean over prompts per
    position over real tokens (`real_mean`), or per row of `table` (`grouped_mean`). `index`
    (``[row * prompt, pos(, head)]``, or None: each element's own position) is the position (or
    mean row) each element reads, where the source's tokens sit elsewhere. `take` (one length
    group of `patch_chunk`, or None): the batch holds those prompts' columns from ``start`` on.
    """
    kind = src[0]
    if kind == "zero":
        return torch.zeros_like(like)
    cached = acts[(src[1], site, layer)].to(like.device)
    if kind == "mean":  # one mean for every row and prompt: a view, not a copy
        table = src[2]
        value = real_mean(cached, None if masks is None else masks.get(src[1])) if table is None \
            else grouped_mean(cached, table)
    else:
        value = cached if src[2] is None else cached[src[2].to(like.device)]
        if take is not None:
            value = value[take["prompts"].to(like.device)]
    n_batch = like.shape[0]
    value = value.expand(n_batch, *value.shape[1:]) if kind == "mean" else rep(value, n_rows)
    index = src[3]
    if index is None:
        value = value if take is None else value[:, take["start"]:]
    else:  # the columns (or mean rows) each element reads, in the whole batch's coordinates
        index = index.to(like.device)
        trailing = value.shape[index.dim():]
        value = value.gather(1, index.reshape(index.shape + (1,) * len(trailing)).expand(*index.shape, *trailing))
    if site == "pattern" and take is not None:  # key positions too (a pass with cached keys never sets a pattern)
        value = value[..., take.get("keys", take["start"]):]
    return value


def call_at(fn, target, rows, head, pos):
    """`target` after the user function `fn` edited its elements ``[rows][:, pos](, head)``."""
    part = target[rows[:, None], pos[None, :]]
    if head is not None:
        part = part[:, :, head]
    part = part.clone()
    out = fn(part)
    out = part if out is None else out
    if tuple(out.shape) != tuple(part.shape):
        raise ValueError(f"an At function returned shape {tuple(out.shape)}; it must keep the shape it was given, "
                         f"{tuple(part.shape)} ([batch, pos, d])")
    target = target.clone()
    if head is None:
        target[rows[:, None], pos[None, :]] = out.to(target.dtype)
    else:
        target[rows[:, None], pos[None, :], head] = out.to(target.dtype)
    return target


def patch_program(nn, spec, progress=None):
    """Cache the runs, then evaluate every chunk's metric. One session, one request remotely.

    `spec`: ``arch``, ``runs`` (see `cache_runs`), ``base`` run name, ``base_ids``
    (``[prompt, pos]``), ``base_embeds``, ``metric`` (name), ``targets`` (``correct``,
    ``incorrect``: ``[prompt]``), ``kl_from`` (run whose logits are the KL reference) and
    ``chunks``: ``[{"start", "n_rows", "writes", "col"}]`` (see `patch_chunk`; ``col`` optional). For left-padded
    prompts, ``base_mask`` (``[prompt, pos]``) and ``masks`` (``{run: [prompt, pos]}``), True on real
    tokens, and ``groups`` (optional, see `patch_chunk`). ``gap`` (optional): two run names; when
    their metrics leave no gap to normalise by (`stop_for_gap`), the program returns before its
    chunks, with ``values`` empty.

    Returns ``{"values": [[row * prompt] per chunk], "runs": {run: metric [prompt]}}``.
    """
    arch = spec["arch"]
    acts = cache_runs(nn, arch, spec["runs"])
    targets = with_clean_logprobs(spec["targets"], acts[(spec["kl_from"], "logits")])
    runs = {key[0]: metric(spec["metric"], logits, targets)
            for key, logits in acts.items() if key[1] == "logits"}
    if stop_for_gap(spec, runs):
        return {"values": [], "runs": runs}
    hidden = []
    for chunk in spec["chunks"]:
        hidden.append(patch_chunk(nn, arch, spec["base_ids"], chunk["n_rows"], chunk["start"], acts, spec["base"],
                                  chunk["writes"], spec["base_embeds"], spec.get("base_mask"), spec.get("masks"),
                                  spec.get("groups"), chunk.get("col", 0)))
        if progress is not None:
            progress(1)
    return {"values": chunk_metrics(nn, arch, spec["metric"], hidden, targets), "runs": runs}


PLAIN_METRICS = ("logit_diff", "logprob", "prob", "log_odds")
"""The built-in metrics that do not read the clean run's log-probabilities (the KL metric does)."""

LOGIT_ELEMENTS = 2**24
"""Logits computed at once by `chunk_metrics` (rows times vocabulary): 64 MiB in float32."""


def chunk_metrics(nn, arch, name, hidden, targets):
    """The metric of every chunk's rows from their final-norm outputs (`patch_chunk`): the
    unembedding runs over the rows of all chunks together, ``LOGIT_ELEMENTS`` logits at a time.
    `targets` are per prompt; a chunk's batch is ``row * prompt + prompt``. ``[[row * prompt] per chunk]``."""
    if not hidden:
        return []
    n_prompts = len(targets["correct"])
    every = torch.cat(hidden)
    prompt = torch.arange(len(every)) % n_prompts
    vocab = torch_module(module(nn, arch["unembed"])).weight.shape[0]
    step = max(n_prompts, LOGIT_ELEMENTS // vocab)
    values = []
    for lo in range(0, len(every), step):
        idx = prompt[lo:lo + step]
        part = {k: (None if v is None or (k == "clean_logprobs" and name in PLAIN_METRICS) else v[idx.to(v.device)])
                for k, v in targets.items()}
        values.append(hidden_metric(nn, arch, name, every[lo:lo + step], part))
    return list(torch.cat(values).split([len(h) for h in hidden]))


def answer_program(nn, arch, prompts, answers):
    """Each prompt (``[1, pos]``, run alone: no padding) and its answer token: the answer's
    softmax probability and the top-1 token at the last position, ``[prompt]`` each."""
    probs, top = [], []
    for i, ids in enumerate(prompts):
        logits = upcast(cache_pass(nn, arch, ids, (i,), ())[(i, "logits")][0])
        probs.append(logits.softmax(-1)[answers[i]])
        top.append(logits.argmax())
    return {"prob": torch.stack(probs), "top": torch.stack(top)}
