"""Shared trace-side helpers: module access, canonical views, metrics, caching runs.

Torch-only (see the package docstring): this module runs on the server too.
"""

import torch

PER_HEAD = ("q", "k", "v", "pattern", "head")


# ---- modules and hook points ---------------------------------------------------------
def module(root, path):
    """The submodule (or envoy) at dotted `path` under `root` ("" is `root` itself)."""
    if path:
        for name in path.split("."):
            root = root[int(name)] if name.isdigit() else getattr(root, name)
    return root


def block(root, arch, layer):
    return module(root, arch["blocks"])[layer]


def torch_module(envoy):
    """The plain ``torch.nn.Module`` behind an envoy (for side computations without hooks)."""
    return getattr(envoy, "_module", envoy)


def point(arch, site, layer):
    """Hook point ``(layer, path, io, rank)`` that carries `site` at `layer`; `rank` orders
    points within a layer in forward order, `path` is relative to the block."""
    if site == "resid_pre":
        return (layer, "", "input", 0)
    if site in ("q", "k", "v"):
        if arch["qkv"] is not None:
            return (layer, arch["qkv"], "output", 1)
        return (layer, arch[site], "output", 1 + "qkv".index(site))
    if site == "pattern":  # the attention module's second output, after it ran (eager attention)
        return (layer, attention_path(arch), "weights", 4.5)
    if site == "head":
        return (layer, arch["o_proj"], "input", 4)
    if site == "attn_out":
        return (layer, arch["attn_out"], "output", 5)
    if site == "resid_mid":
        return (layer, arch["mid_norm"], "input", 6)
    if site == "mlp_out":
        return (layer, arch["mlp_out"], "output", 7)
    if site == "resid_post":
        return (layer, "", "output", 8)
    raise ValueError(f"unknown site {site!r}")


def mlp_in_point(arch, layer):
    """The input of the norm in front of the MLP: the residual stream the MLP reads."""
    return (layer, arch["mid_norm"], "input", 6)


def write_point(arch, site, layer):
    """The point written to patch `site`: resid_mid is written through the attention branch, a
    pattern through the head outputs it weighs (``z = pattern @ v``)."""
    return point(arch, {"resid_mid": "attn_out", "pattern": "head"}.get(site, site), layer)


def attention_path(arch):
    """The attention module (relative to a block): the parent of the output projection."""
    return arch["o_proj"].rpartition(".")[0]


def at(root, arch, pt):
    """The module (or envoy) of hook point `pt`."""
    return module(block(root, arch, pt[0]), pt[1])


def read(envoy, io):
    if io == "weights":
        return envoy.output[1]
    return envoy.output if io == "output" else envoy.input


def first(value):
    """A module value's tensor: the first element of a tuple output."""
    return value[0] if isinstance(value, tuple) else value


def write(envoy, io, value, new):
    """Replace the tensor of `value` (read from `envoy`) with `new`."""
    if new is first(value):
        return
    if io == "input":
        envoy.input = new
    else:
        envoy.output = (new, *value[1:]) if isinstance(value, tuple) else new


def skip_value(arch, resid):
    """What a skipped block returns: `resid` (the residual stream entering the next block)."""
    return (resid,) + (None,) * (arch["arity"] - 1) if arch["arity"] else resid


def rep(t, n_rows):
    """`n_rows` copies of a ``[prompt, ...]`` tensor along the batch: row ``r * prompt + p``."""
    return t.repeat(n_rows, *([1] * (t.dim() - 1)))


# ---- canonical views -----------------------------------------------------------------
def n_heads_at(arch, site):
    return arch["n_kv_heads"] if site in ("k", "v") else arch["n_heads"]


def view(arch, site, raw):
    """The site's value in canonical shape: ``[batch, pos, d_model]`` or ``[batch, pos, head, d_head]``."""
    if site not in PER_HEAD:
        return raw
    if site == "pattern":  # [batch, head, query, key] -> [batch, query, head, key]
        return raw.transpose(1, 2)
    b, t = raw.shape[:2]
    dh = arch["d_head"]
    if site == "head" or arch["qkv"] is None:
        return raw.reshape(b, t, n_heads_at(arch, site), dh)
    i = "qkv".index(site)
    if arch["qkv_layout"] == "split3":
        d = arch["n_heads"] * dh
        return raw[..., i * d:(i + 1) * d].reshape(b, t, arch["n_heads"], dh)
    return raw.reshape(b, t, arch["n_heads"], 3, dh)[..., i, :]


def unview(arch, site, raw, new):
    """Inverse of `view`: the raw module value with the site's part replaced by `new`."""
    if site not in PER_HEAD:
        return new
    b, t = raw.shape[:2]
    if site == "head" or arch["qkv"] is None:
        return new.reshape(raw.shape)
    i = "qkv".index(site)
    out = raw.clone()
    if arch["qkv_layout"] == "split3":
        d = arch["n_heads"] * arch["d_head"]
        out[..., i * d:(i + 1) * d] = new.reshape(b, t, d)
    else:
        out.view(b, t, arch["n_heads"], 3, arch["d_head"])[..., i, :] = new
    return out


# ---- weights (read through envoys, so they are the server's weights when remote) ------
def _in_out(weight, conv1d):
    """A projection weight as ``[in, out]`` (GPT-2's Conv1D stores it that way already)."""
    return weight if conv1d else weight.T


def head_weights(root, arch, layer):
    """Output projection split per head, ``[head, d_head, d_model]`` (no bias)."""
    weight = _in_out(at(root, arch, point(arch, "head", layer)).weight, arch["conv1d"])
    return weight.reshape(arch["n_heads"], arch["d_head"], arch["d_model"])


def input_head_weights(root, arch, site, layer):
    """The q, k or v projection per (key/value) head: weight ``[d_model, head, d_head]`` and
    bias ``[head, d_head]`` (zeros without one): head h's slice is ``x @ weight[:, h] + bias[h]``."""
    proj = at(root, arch, point(arch, site, layer))
    weight = _in_out(proj.weight, arch["conv1d"])
    bias = getattr(proj, "bias", None)
    bias = torch.zeros_like(weight[0]) if bias is None else bias
    return view(arch, site, weight[None])[0], view(arch, site, bias[None, None])[0, 0]


def head_contributions(root, arch, layer, z):
    """Each head's contribution to the residual stream, ``[batch, pos, head, d_model]``, from
    the head outputs `z` (``[batch, pos, head, d_head]``): its slice of the output projection,
    without the bias. Gemma's post-attention norm is split over heads with the RMS scale of
    the whole attention output, so the contributions still sum to the branch output."""
    out = torch.einsum("bthe,hed->bthd", z, head_weights(root, arch, layer).to(z.dtype))
    if arch["post_norms"]:  # in float32, as Gemma's RMSNorm computes (in a float64 model too)
        norm = torch_module(at(root, arch, point(arch, "attn_out", layer)))
        total = out.sum(2).float()
        scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.float())
        out = (out.float() * scale[:, :, None, :]).to(z.dtype)
    return out


def upcast(t):
    """`t` in at least float32: half precision (float16, bfloat16) becomes float32, float64 stays."""
    return t.float() if t.is_floating_point() and t.dtype.itemsize < 4 else t


# ---- metrics ----------------------------------------------------------------------------
def answer_values(values, ids):
    """``values`` (``[batch, vocab]``) of the answers ``ids``: ``[batch]`` one token each, or
    ``[batch, answer]`` sets padded with -1, combined by logsumexp."""
    ids = ids.to(values.device)
    if ids.dim() == 1:
        return values.gather(-1, ids[:, None])[:, 0]
    return _combined(values.gather(-1, ids.clamp(min=0)), ids)


def _combined(picked, ids):
    """Answer sets' values ``picked`` (``[batch, answer]``, -1 in `ids` for padding) combined by logsumexp."""
    return torch.logsumexp(picked.masked_fill(ids < 0, float("-inf")), -1)


def final_logits(nn, arch, hidden, ids=None):
    """The model's logits from its final-norm outputs `hidden` (``[batch, d_model]``): the unembedding
    (and Gemma's final soft cap), computed outside the forward pass so that many passes share one
    matrix product. ``[batch, vocab]``; with answer `ids` (``[batch]`` or ``[batch, answer]``, -1
    padding), only those tokens' logits, ``[batch]`` or ``[batch, answer]``."""
    unembed = torch_module(module(nn, arch["unembed"]))
    if ids is None:
        logits = unembed(hidden)
    else:
        ids = ids.to(hidden.device)
        rows = unembed.weight[ids.clamp(min=0)].to(hidden.dtype)  # [batch, (answer,) d_model]
        logits = torch.einsum("bd,bkd->bk", hidden, rows if ids.dim() == 2 else rows[:, None])
        if getattr(unembed, "bias", None) is not None:
            logits = logits + unembed.bias[ids.clamp(min=0)].reshape(logits.shape).to(logits.dtype)
        logits = logits if ids.dim() == 2 else logits[:, 0]
    cap = arch.get("final_softcap")
    return logits if not cap else torch.tanh(logits / cap) * cap


def hidden_metric(nn, arch, name, hidden, targets):
    """`metric` from final-norm outputs `hidden` (``[batch, d_model]``), `final_logits` of them: the
    logit difference reads the answers' logits only (no product with the whole vocabulary)."""
    if name != "logit_diff":
        return metric(name, final_logits(nn, arch, hidden), targets)
    values = []
    for ids in (targets["correct"], targets["incorrect"]):
        picked = upcast(final_logits(nn, arch, hidden, ids))
        values.append(picked if ids.dim() == 1 else _combined(picked, ids.to(picked.device)))
    return values[0] - values[1]


def metric(name, logits, targets):
    """Metric per row, ``[batch]``, from final-position logits ``[batch, vocab]``.

    `name`: a metric name, or a user function ``f(logits, targets) -> [batch]``. `targets`: dict
    with ``correct``, ``incorrect`` (``[batch]`` token ids, or ``[batch, answer]`` sets padded with
    -1) and, for KL, ``clean_logprobs`` (``[batch, vocab]``). Computed in at least float32 (`upcast`).
    """
    logits = upcast(logits)
    if callable(name):
        return name(logits, targets)
    if name == "logit_diff":
        return answer_values(logits, targets["correct"]) - answer_values(logits, targets["incorrect"])
    logprobs = torch.log_softmax(logits, dim=-1)
    if name == "logprob":
        return answer_values(logprobs, targets["correct"])
    if name == "prob":
        return answer_values(logprobs, targets["correct"]).exp()
    if name == "log_odds":
        lp = answer_values(logprobs, targets["correct"])
        return lp - torch.log(-torch.expm1(lp))
    if name == "kl":
        clean = targets.get("clean_logprobs")
        if clean is None:
            raise ValueError("the KL metric needs clean_logprobs")
        clean = clean.to(logprobs.device)
        return (clean.exp() * (clean - logprobs)).sum(-1)
    raise ValueError(f"unknown metric {name!r}")


MIN_GAP = 1e-6
"""Smallest gap between two runs' mean metric (metric units) that a sweep may normalise by."""
MIN_GAP_FRACTION = 0.01
"""The gap must also be at least this fraction of the mean per-prompt gap: smaller, the pairs cancel."""


def gap_too_small(a, b):
    """Whether runs `a` and `b` (metric per prompt, ``[prompt]``) are too close to normalise by:
    a non-finite or tiny mean gap (below `MIN_GAP`), or per-prompt gaps that cancel (the mean
    gap below `MIN_GAP_FRACTION` of the mean per-prompt |gap|)."""
    d = a.detach().cpu().double() - b.detach().cpu().double()  # [prompt]: cheap anywhere
    gap = d.mean().abs()
    return bool(not torch.isfinite(gap) or gap < MIN_GAP or gap < MIN_GAP_FRACTION * d.abs().mean())


def stop_for_gap(spec, runs):
    """Whether a program must stop before its sweep: ``spec["gap"]`` names two runs (or is None)
    whose metrics `runs` are too close (`gap_too_small`); the client then raises."""
    pair = spec.get("gap")
    return pair is not None and gap_too_small(runs[pair[0]], runs[pair[1]])


def repeat_targets(targets, n):
    """Targets for `n` copies of the prompts along the batch."""
    return {k: (None if v is None else v.repeat(n, *([1] * (v.dim() - 1)))) for k, v in targets.items()}


def with_clean_logprobs(targets, clean_logits):
    """`targets` plus the clean run's log-probabilities (for the KL metric)."""
    return {**targets, "clean_logprobs": torch.log_softmax(upcast(clean_logits), dim=-1)}


# ---- caching runs -------------------------------------------------------------------------
def padding(mask):
    """The keyword arguments of a forward pass over left-padded prompts: the attention mask
    (`mask`, ``[batch, pos]`` bool, True on real tokens) and the position ids that count real
    tokens only (learned absolute and rotary embeddings alike; GPT-2-style models do not derive
    them from the mask). None: no padding, no arguments."""
    if mask is None:
        return {}
    mask = mask.long()
    return {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def clear_padding(resid, mask):
    """The block input `resid` (``[batch, pos, d_model]``) with 0 at padding (`mask` False).

    Real tokens never attend to padding, but a padding *query* attends to nothing, and models that
    take the softmax in float32 (Llama, Qwen2, Gemma, ...) turn a float64 model's fully masked row
    into NaN there; 0 times NaN in the next layer's value product would reach real tokens. Cleared
    at every block input, padding stays finite and real tokens equal the prompt run alone."""
    return torch.where(mask.to(resid.device)[..., None], resid, torch.zeros((), dtype=resid.dtype,
                                                                            device=resid.device))


def cleared_block_input(nn, arch, layer, mask):
    """Block `layer`'s input with left padding cleared (`clear_padding`) and written back, for the
    passes that walk the blocks one by one; `mask` (``[batch, pos]``) None: the input as it is."""
    blk = block(nn, arch, layer)
    resid = blk.input
    if mask is not None:
        resid = clear_padding(resid, mask)
        blk.input = resid
    return resid


def cache_pass(nn, arch, ids, names, sites, embeds=None, mask=None, kv=None):
    """One forward pass over several runs stacked along the batch (``ids``: ``[run * prompt, pos]``).

    Records the activations at `sites` (``(site, layer)`` pairs) of each run, in canonical
    shape, and the final position's logits. With `embeds` (``[run * prompt, pos, d_model]``)
    the runs start from those block-0 inputs instead of their token embeddings. `mask`
    (``[run * prompt, pos]``, True on real tokens) marks left padding (`padding`). With `kv` (a KV-cache
    class whose layers keep every key, transformers' ``DynamicCache``, sent by the client: kernels
    import only torch) the keys and values every layer's attention caches are kept too, as ``(run,
    "past_keys" | "past_values", layer)``: ``[prompt, kv_head, pos, d_head]`` (the KV-cache layout,
    rotary embeddings applied), and the class as ``"kv_class"``.

    Returns ``{(run, site, layer): [prompt, ...]}`` plus ``{(run, "logits"): [prompt, vocab]}``.
    """
    sites = set(sites)
    if embeds is not None:
        sites.add(("resid_pre", 0))
    by_point = {}
    for site, layer in sites:
        by_point.setdefault(point(arch, site, layer), []).append(site)
    if mask is not None:  # every block input is cleared at padding (`clear_padding`)
        for layer in range(arch["n_layers"]):
            by_point.setdefault(point(arch, "resid_pre", layer), [])
    embed_point = point(arch, "resid_pre", 0)
    store = {}
    options = {"cache": kv(), "use_cache": True} if kv else {}  # else the model's default, as a plain forward call
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1, **padding(mask), **options):
        for pt in sorted(by_point, key=lambda p: (p[0], p[3])):
            envoy = at(nn, arch, pt)
            if embeds is not None and pt == embed_point:
                envoy.input = embeds.to(envoy.input.device)
            if mask is not None and pt[1] == "" and pt[2] == "input":
                envoy.input = clear_padding(envoy.input, mask)
            raw = first(read(envoy, pt[2]))
            for site in by_point[pt]:
                store[(site, pt[0])] = view(arch, site, raw).clone()
        store["logits"] = nn.output.logits[:, -1].clone()
        if kv:
            cache = nn.output.cache
            for layer in range(arch["n_layers"]):
                store[("past_keys", layer)] = cache.layers[layer].keys
                store[("past_values", layer)] = cache.layers[layer].values
    n = ids.shape[0] // len(names)
    out = {"kv_class": kv} if kv else {}
    for (key, value) in store.items():
        for i, name in enumerate(names):
            part = value[i * n:(i + 1) * n]
            out[(name, "logits") if key == "logits" else (name,) + key] = part
    return out
