"""Independent reference for activation reading and patching, with plain PyTorch hooks.

patchlab's nnsight-based runner is tested against this module. It uses only
``register_forward_hook`` / ``register_forward_pre_hook`` on the Hugging Face
modules (no nnsight, no patchlab), so the two are independent computations.

Sites and their canonical shapes (``b`` batch, ``p`` pos):

- ``resid_pre``  block input, ``[b, p, d_model]``.
- ``resid_post`` block output (GPT-Neo blocks return a tuple: its first element).
- ``attn_out``   attention branch as added to the residual: the attention module's
  ``output[0]``; for Gemma2/3 the output of ``post_attention_layernorm``.
- ``mlp_out``    MLP branch as added to the residual: the ``mlp`` output; for
  Gemma2/3 the output of ``post_feedforward_layernorm``.
- ``resid_mid``  ``resid_pre + attn_out`` (sequential-residual models only). Patching it
  sets the residual after attention, seen both by the MLP and by the residual carried
  on; this is done by rewriting ``attn_out := target - resid_pre`` (exact up to one
  float rounding).
- ``head``       input of the output projection, ``[b, p, n_heads, d_head]``.
- ``q``/``k``/``v``  projection outputs before rotary / q-k norm,
  ``[b, p, n_heads or n_kv_heads, d_head]``. GPT-2's fused ``c_attn`` output is
  ``[q | k | v]`` along the last dim; GPT-NeoX's fused ``query_key_value`` output is
  ``[b, p, n_heads, q | k | v]`` (interleaved per head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["SITES", "HEAD_SITES", "RefPatch", "reference_cache", "reference_patched_logits", "is_parallel"]

SITES = ("resid_pre", "q", "k", "v", "head", "attn_out", "resid_mid", "mlp_out", "resid_post")
HEAD_SITES = ("q", "k", "v", "head")

# model_type -> (path of the block list, attention module in a block, out-proj in it,
#                separate q/k/v projection names or the fused projection's name)
_FAMILY = {
    "gpt2": ("transformer.h", "attn", "c_proj", "c_attn"),
    "gpt_neo": ("transformer.h", "attn", "attention.out_proj", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    "gpt_neox": ("gpt_neox.layers", "attention", "dense", "query_key_value"),
}
_LLAMA_LIKE = ("model.layers", "self_attn", "o_proj", ("q_proj", "k_proj", "v_proj"))
for _t in ("llama", "mistral", "qwen2", "gemma2", "gemma3_text"):
    _FAMILY[_t] = _LLAMA_LIKE
_GEMMA = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class RefPatch:
    """Replace ``site`` at ``layer`` (``head``, ``pos``) with the same slots of ``value``, or
    with ``fn(slots)``.

    ``value`` is the full activation of the source run in canonical shape, with the
    batch size of the patched run. ``fn`` instead maps the current slots (``[b, len(pos), ...]``;
    for ``resid_mid``, of ``resid_pre + attn_out``) to their new value. ``head`` is required for
    per-head sites (None there means all heads) and must be None otherwise; ``pos`` None means
    all positions.
    """

    site: str
    layer: int
    head: int | None
    pos: tuple[int, ...] | None
    value: torch.Tensor | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None


def is_parallel(model: nn.Module) -> bool:
    """Whether attention and MLP read the same residual (GPT-NeoX / Pythia default)."""
    return model.config.model_type == "gpt_neox" and bool(model.config.use_parallel_residual)


def _family(model: nn.Module) -> tuple:
    try:
        return _FAMILY[model.config.model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model.config.model_type!r}") from None


def _dims(model: nn.Module) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, d_head)."""
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_heads, n_kv, d_head


def _block(model: nn.Module, layer: int) -> nn.Module:
    blocks = model.get_submodule(_family(model)[0])
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range for a {len(blocks)}-layer model")
    return blocks[layer]


# ---------------------------------------------------------------------------
# Where each site lives: (module, hook kind, canonical view).
#   kind "pre": forward pre-hook, the tensor is the first positional arg (or the
#   ``hidden_states`` kwarg); kind "out": forward hook on the output (tensor, or
#   tuple whose first element is the tensor).
#   view(t) returns a *view* of t in canonical shape, so writing into it writes t.


def _locate(model: nn.Module, site: str, layer: int) -> tuple[nn.Module, str, Callable]:
    _, attn_name, out_proj, qkv = _family(model)
    block = _block(model, layer)
    attn = block.get_submodule(attn_name)
    n_heads, _, d_head = _dims(model)
    gemma = model.config.model_type in _GEMMA
    ident = lambda t: t  # noqa: E731

    if site == "resid_pre":
        return block, "pre", ident
    if site == "resid_post":
        return block, "out", ident
    if site == "attn_out":
        return (block.post_attention_layernorm, "out", ident) if gemma else (attn, "out", ident)
    if site == "mlp_out":
        return (block.post_feedforward_layernorm, "out", ident) if gemma else (block.mlp, "out", ident)
    if site == "head":
        return attn.get_submodule(out_proj), "pre", lambda t: t.unflatten(-1, (n_heads, d_head))
    if site in ("q", "k", "v"):
        i = "qkv".index(site)
        if isinstance(qkv, tuple):  # separate projections
            return attn.get_submodule(qkv[i]), "out", lambda t: t.unflatten(-1, (-1, d_head))
        fused = attn.get_submodule(qkv)
        if model.config.model_type == "gpt2":  # [q | k | v], each n_heads * d_head wide
            width = n_heads * d_head
            return fused, "out", lambda t: t[..., i * width : (i + 1) * width].unflatten(-1, (n_heads, d_head))
        # gpt_neox: per head [q | k | v]
        return fused, "out", lambda t: t.unflatten(-1, (n_heads, 3 * d_head))[..., i * d_head : (i + 1) * d_head]
    raise ValueError(f"unknown site {site!r}; expected one of {SITES}")


def _get(kind: str, args: tuple, kwargs: dict, output) -> torch.Tensor:
    if kind == "pre":
        return args[0] if args else kwargs["hidden_states"]
    return output[0] if isinstance(output, tuple) else output


def _hook(module: nn.Module, kind: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register ``fn(tensor) -> replacement or None`` on ``module``; return the handle."""
    if kind == "pre":

        def pre_hook(mod, args, kwargs):
            new = fn(_get("pre", args, kwargs, None))
            if new is None:
                return None
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def out_hook(mod, args, output):
        new = fn(_get("out", (), {}, output))
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(out_hook)


def _index(head: int | None, pos: tuple[int, ...] | None, ndim: int) -> tuple:
    """Index into a canonical ``[b, p, ...]`` tensor selecting ``pos`` (and ``head``)."""
    p = slice(None) if pos is None else torch.tensor(pos, dtype=torch.long)
    if ndim == 3:
        return (slice(None), p)
    if head is None:
        return (slice(None), p, slice(None))
    # An int head next to a pos tensor: adjacent advanced indices, giving [b, len(pos), d_head].
    return (slice(None), p, head)


def _check(model: nn.Module, patch: RefPatch) -> None:
    if patch.site not in SITES:
        raise ValueError(f"unknown site {patch.site!r}; expected one of {SITES}")
    if patch.site not in HEAD_SITES and patch.head is not None:
        raise ValueError(f"site {patch.site!r} has no heads, got head={patch.head}")
    if patch.site == "resid_mid" and is_parallel(model):
        raise ValueError("resid_mid is not defined for a parallel-residual model (GPT-NeoX)")


def _run(model, input_ids, patches: Sequence[RefPatch], sites: Sequence[tuple[str, int]]):
    """One forward pass with ``patches`` applied; return (logits [b, p, vocab], cache)."""
    handles = []
    cache: dict[tuple[str, int], torch.Tensor] = {}
    resid_pre_now: dict[int, torch.Tensor] = {}  # this run's block inputs, for resid_mid
    try:
        for patch in patches:
            _check(model, patch)
            site = "attn_out" if patch.site == "resid_mid" else patch.site
            module, kind, view = _locate(model, site, patch.layer)

            def write(t, patch=patch, view=view):
                t = t.clone()
                idx = _index(patch.head, patch.pos, view(t).dim())
                if patch.fn is not None:
                    current = resid_pre_now[patch.layer] + t if patch.site == "resid_mid" else view(t)
                    src = patch.fn(current[idx].clone())
                else:
                    if view(t).shape != patch.value.shape:
                        raise ValueError(
                            f"{patch.site} L{patch.layer}: value shape {tuple(patch.value.shape)} "
                            f"!= activation shape {tuple(view(t).shape)}"
                        )
                    src = patch.value.to(device=t.device, dtype=t.dtype)[idx]
                if patch.site == "resid_mid":  # attn_out := target - resid_pre
                    src = src - resid_pre_now[patch.layer][idx]
                view(t)[idx] = src
                return t

            handles.append(_hook(module, kind, write))

        # Readers go last: each sees its module's activation after every patch on it.
        mid_layers = {p.layer for p in patches if p.site == "resid_mid"}
        mid_layers |= {layer for site, layer in sites if site == "resid_mid"}
        for layer in sorted(mid_layers):
            def remember(t, layer=layer):
                resid_pre_now[layer] = t
            handles.append(_hook(_block(model, layer), "pre", remember))

        for site, layer in sites:
            if site == "resid_mid":
                if is_parallel(model):
                    raise ValueError("resid_mid is not defined for a parallel-residual model (GPT-NeoX)")
                module, kind, view = _locate(model, "attn_out", layer)

                def read(t, key=(site, layer)):
                    cache[key] = (resid_pre_now[key[1]] + t).clone()
            else:
                module, kind, view = _locate(model, site, layer)

                def read(t, key=(site, layer), view=view):
                    cache[key] = view(t).clone()

            handles.append(_hook(module, kind, read))

        with torch.no_grad():
            logits = model(input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, {key: cache[key] for key in sites}


def reference_cache(
    model: nn.Module,
    input_ids: torch.LongTensor,
    sites: list[tuple[str, int]],
    *,
    patches: Sequence[RefPatch] = (),
) -> dict[tuple[str, int], torch.Tensor]:
    """Run ``model`` once with plain hooks; return a clone of each ``(site, layer)`` activation.

    Shapes are canonical (see the module docstring); per-head sites hold all heads.
    With ``patches``, activations are read in the patched run, after the patches
    (a patched site reads back its patched value).

    Raises:
        ValueError: an unknown site, a layer out of range, or ``resid_mid`` on a
            parallel-residual model.
    """
    return _run(model, input_ids, patches, sites)[1]


def reference_patched_logits(
    model: nn.Module, input_ids: torch.LongTensor, patches: list[RefPatch]
) -> torch.Tensor:
    """Run ``input_ids`` with each patch applied; return final-position logits ``[batch, vocab]``.

    Each patch replaces its site's activation at its head and positions with
    ``value`` there, leaving everything else as computed. Patches apply in list
    order, so a later patch on the same slots wins.

    Raises:
        ValueError: as `reference_cache`, or a head given on a non-head site.
    """
    return _run(model, input_ids, patches, [])[0][:, -1]
