"""Independent reference for graph-level patching (edge patching and path patching).

patchlab's batched nnsight implementation is tested against this module. It uses only
plain PyTorch forward hooks and direct ``module.forward`` calls (which bypass hooks),
plus the node-level hooks of ``tests/reference.py``; no nnsight, no patchlab.

The computational graph (Wang et al. 2022, arXiv 2211.00593; Conmy et al. 2023,
arXiv 2304.14997). Nodes are tuples:

- senders ``("embed",)``, ``("head", L, h)``, ``("mlp", L)``; each writes a
  *contribution* ``[b, p, d_model]`` additively into the residual stream:
  embed = block 0's input; head = ``z_h @ W_O[:, h-slice]^T`` without the out-proj
  bias (Gemma2/3: times the ``post_attention_layernorm`` scale of the whole attention
  output of the same pass, ``o_h * rsqrt(mean(o**2) + eps) * (1 + w)`` in float32
  cast back, so a layer's heads sum to the branch output); MLP = its branch output as
  added to the residual (Gemma: ``post_feedforward_layernorm`` output). Out-proj
  biases belong to no sender.
- receivers ``("head", L, h)`` with channels q, k, v (for k/v on grouped-query models
  ``h`` is the key/value head), ``("mlp", L)`` and ``("logits",)`` with channel "in".
  A receiver reads the input of its pre-norm: the block input for heads, the input of
  the MLP pre-norm for MLPs (post-attention residual, or the block input for a
  parallel-residual GPT-NeoX), the last block's output for the logits.

Edge patching and path patching are different quantities; see the two functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

if __package__:
    from .reference import _GEMMA, RefPatch, _block, _dims, _family, _hook, _locate, is_parallel
    from .reference import reference_cache, reference_patched_logits
else:
    from reference import _GEMMA, RefPatch, _block, _dims, _family, _hook, _locate, is_parallel
    from reference import reference_cache, reference_patched_logits

__all__ = [
    "RefEdge",
    "graph_senders",
    "graph_receivers",
    "feeds",
    "edges_into",
    "reference_contributions",
    "reference_edge_patched_logits",
    "reference_path_patched_logits",
    "reference_multihop_path_patched_logits",
]

Node = tuple
LOGITS: Node = ("logits",)

# model_type -> (attention pre-norm in a block, MLP pre-norm in a block, final norm path)
_NORMS = {
    "gpt2": ("ln_1", "ln_2", "transformer.ln_f"),
    "gpt_neo": ("ln_1", "ln_2", "transformer.ln_f"),
    "gpt_neox": ("input_layernorm", "post_attention_layernorm", "gpt_neox.final_layer_norm"),
}
for _t in ("llama", "mistral", "qwen2"):
    _NORMS[_t] = ("input_layernorm", "post_attention_layernorm", "model.norm")
for _t in _GEMMA:
    _NORMS[_t] = ("input_layernorm", "pre_feedforward_layernorm", "model.norm")


@dataclass(frozen=True)
class RefEdge:
    """An edge ``sender -> receiver.channel``, at one position ``pos`` or at all (None)."""

    sender: tuple
    receiver: tuple
    channel: str
    pos: int | None = None


# --------------------------------------------------------------------------- the graph


def _n_layers(model: nn.Module) -> int:
    return len(model.get_submodule(_family(model)[0]))


def graph_senders(model: nn.Module) -> list[Node]:
    """Every sender in forward order: embed, then per layer its heads and its MLP."""
    n_heads = _dims(model)[0]
    out: list[Node] = [("embed",)]
    for layer in range(_n_layers(model)):
        out += [("head", layer, h) for h in range(n_heads)] + [("mlp", layer)]
    return out


def graph_receivers(model: nn.Module) -> list[tuple[Node, str]]:
    """Every receiver channel ``(node, channel)`` in forward order."""
    n_heads, n_kv, _ = _dims(model)
    out: list[tuple[Node, str]] = []
    for layer in range(_n_layers(model)):
        for c in "qkv":
            out += [(("head", layer, h), c) for h in range(n_heads if c == "q" else n_kv)]
        out.append((("mlp", layer), "in"))
    return out + [(LOGITS, "in")]


def _check_sender(model: nn.Module, node: Node, *, embed: bool = True) -> None:
    n_layers, n_heads = _n_layers(model), _dims(model)[0]
    ok = (
        (node == ("embed",) and embed)
        or (len(node) == 3 and node[0] == "head" and 0 <= node[1] < n_layers and 0 <= node[2] < n_heads)
        or (len(node) == 2 and node[0] == "mlp" and 0 <= node[1] < n_layers)
    )
    if not ok:
        raise ValueError(f"invalid sender {node!r}")


def _check_receiver(model: nn.Module, node: Node, channel: str) -> None:
    n_layers, (n_heads, n_kv, _) = _n_layers(model), _dims(model)
    if len(node) == 3 and node[0] == "head" and 0 <= node[1] < n_layers:
        if channel not in ("q", "k", "v"):
            raise ValueError(f"head receiver {node!r} has channels q, k, v, got {channel!r}")
        width = n_heads if channel == "q" else n_kv
        if not 0 <= node[2] < width:
            raise ValueError(f"{channel} receiver {node!r}: head index must be < {width}")
        return
    if node == LOGITS or (len(node) == 2 and node[0] == "mlp" and 0 <= node[1] < n_layers):
        if channel != "in":
            raise ValueError(f"receiver {node!r} has one channel 'in', got {channel!r}")
        return
    raise ValueError(f"invalid receiver {node!r}")


def feeds(model: nn.Module, sender: Node, receiver: Node) -> bool:
    """Whether ``sender`` writes to the residual that ``receiver`` reads (an edge exists)."""
    if receiver == LOGITS or sender == ("embed",):
        return True
    layer = receiver[1]
    if sender[0] == "mlp" or receiver[0] == "head":
        return sender[1] < layer
    return sender[1] < layer or (sender[1] == layer and not is_parallel(model))  # head -> MLP


def edges_into(model: nn.Module, receiver: Node, channel: str, pos: int | None = None) -> list[RefEdge]:
    """All edges into ``receiver.channel`` (at ``pos``), senders in forward order."""
    _check_receiver(model, receiver, channel)
    return [RefEdge(s, receiver, channel, pos) for s in graph_senders(model) if feeds(model, s, receiver)]


# --------------------------------------------------------------------------- one forward pass


def _head_outputs(proj: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Per-head out-projection ``[b, p, n_heads, d_model]`` of ``z [b, p, n_heads, d_head]``, no bias."""
    n_heads, d_head = z.shape[-2:]
    if isinstance(proj, nn.Linear):  # weight [d_model, n_heads * d_head]
        return torch.einsum("bphd,mhd->bphm", z, proj.weight.unflatten(1, (n_heads, d_head)))
    if type(proj).__name__ == "Conv1D":  # GPT-2: weight [n_heads * d_head, d_model]
        return torch.einsum("bphd,hdm->bphm", z, proj.weight.unflatten(0, (n_heads, d_head)))
    raise TypeError(f"unsupported output projection {type(proj).__name__}")


def _gemma_scaled(norm: nn.Module, o: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    """Gemma RMSNorm of the whole ``o`` applied to each head's share ``per_head``.

    Mirrors ``Gemma2RMSNorm.forward``: float32, ``x * rsqrt(mean(x**2) + eps) * (1 + w)``,
    cast back to ``o``'s dtype. An ``nn.Identity`` in its place (tests) leaves shares as they are.
    """
    if isinstance(norm, nn.Identity):
        return per_head
    scale = torch.rsqrt(o.float().pow(2).mean(-1, keepdim=True) + norm.eps).unsqueeze(-2)
    return (per_head.float() * scale * (1.0 + norm.weight.float())).type_as(o)


def _edge_run(model: nn.Module, input_ids: torch.Tensor, edges: Sequence[RefEdge], source: dict):
    """Run ``input_ids`` with ``edges`` patched from the ``source`` contributions.

    Returns (final-position logits ``[b, vocab]``, this pass's contributions by sender).
    """
    in_norm, mlp_norm, final_norm = _NORMS[model.config.model_type]
    gemma = model.config.model_type in _GEMMA
    current: dict[Node, torch.Tensor] = {}
    resid: dict[int, torch.Tensor] = {}  # block inputs of this pass
    head_out: dict[int, torch.Tensor] = {}  # unscaled per-head outputs (Gemma)
    handles = []

    def delta(group: list[RefEdge], like: torch.Tensor) -> torch.Tensor:
        d = torch.zeros_like(like)
        for e in group:
            diff = source[e.sender] - current[e.sender]
            if e.pos is None:
                d += diff
            else:
                d[:, e.pos] += diff[:, e.pos]
        return d

    try:
        # Readers of this pass's contributions.
        for layer in range(_n_layers(model)):
            block = _block(model, layer)

            def read_resid(x, layer=layer):
                resid[layer] = x
                if layer == 0:
                    current[("embed",)] = x

            handles.append(_hook(block.get_submodule(in_norm), "pre", read_resid))
            out_proj, _, view = _locate(model, "head", layer)

            def read_z(z, layer=layer, proj=out_proj, view=view):
                per_head = _head_outputs(proj, view(z))
                if gemma:
                    head_out[layer] = per_head
                else:
                    current.update({("head", layer, h): per_head[:, :, h] for h in range(per_head.shape[2])})

            handles.append(_hook(out_proj, "pre", read_z))
            if gemma:
                post = block.post_attention_layernorm

                def read_o(o, layer=layer, post=post):
                    scaled = _gemma_scaled(post, o, head_out[layer])
                    current.update({("head", layer, h): scaled[:, :, h] for h in range(scaled.shape[2])})

                handles.append(_hook(post, "pre", read_o))
            branch = block.post_feedforward_layernorm if gemma else block.mlp
            handles.append(_hook(branch, "out", lambda t, layer=layer: current.__setitem__(("mlp", layer), t)))

        # Writers: one per patched receiver channel.
        groups: dict[tuple[Node, str], list[RefEdge]] = {}
        for e in edges:
            groups.setdefault((e.receiver, e.channel), []).append(e)
        for (receiver, channel), group in groups.items():
            if receiver[0] == "head":
                layer, h = receiver[1], receiver[2]
                proj, _, view = _locate(model, channel, layer)
                norm = _block(model, layer).get_submodule(in_norm)

                def write_head(t, layer=layer, h=h, proj=proj, view=view, norm=norm, group=group):
                    x = resid[layer]
                    new = view(proj.forward(norm.forward(x + delta(group, x))))
                    t = t.clone()
                    view(t)[:, :, h] = new[:, :, h]
                    return t

                handles.append(_hook(proj, "out", write_head))
            else:
                norm = (
                    model.get_submodule(final_norm)
                    if receiver == LOGITS
                    else _block(model, receiver[1]).get_submodule(mlp_norm)
                )
                handles.append(_hook(norm, "pre", lambda x, group=group: x + delta(group, x)))

        with torch.no_grad():
            logits = model(input_ids, use_cache=False).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits, current


def reference_contributions(model: nn.Module, input_ids: torch.LongTensor) -> dict[Node, torch.Tensor]:
    """Every sender's contribution ``[b, p, d_model]`` in a plain run of ``input_ids``."""
    return _edge_run(model, input_ids, [], {})[1]


def _check_edges(model: nn.Module, edges: Sequence[RefEdge], seq: int) -> None:
    seen: dict[tuple, set] = {}
    for e in edges:
        _check_sender(model, e.sender)
        _check_receiver(model, e.receiver, e.channel)
        if not feeds(model, e.sender, e.receiver):
            raise ValueError(f"no edge {e.sender!r} -> {e.receiver!r}: the receiver must come after the sender")
        if e.pos is not None and not 0 <= e.pos < seq:
            raise ValueError(f"edge position {e.pos} out of range for {seq} tokens")
        positions = seen.setdefault((e.sender, e.receiver, e.channel), set())
        if e.pos in positions or (positions and (e.pos is None or None in positions)):
            raise ValueError(f"edge {e!r} given twice (overlapping positions)")
        positions.add(e.pos)


def reference_edge_patched_logits(
    model: nn.Module, base_ids: torch.LongTensor, source_ids: torch.LongTensor, edges: list[RefEdge]
) -> torch.Tensor:
    """Edge patching (ACDC / auto-circuit style, "current" sender outputs): final-position logits ``[b, vocab]``.

    The source run's contributions ``out_s(source)`` are cached. In the base run, each
    receiver channel with patched edges reads
    ``x + sum_{patched s -> r.c} (out_s(source) - out_s(current))`` (only at ``pos`` for a
    token-specific edge), where ``x`` and ``out_s(current)`` are this patched pass's own
    values. The channel is then recomputed exactly from it: a head's pre-norm and q/k/v
    projection, replacing only that (key/value) head's slice of the projection output
    (before rotary / q-k norms); an MLP's whole branch (pre-norm, MLP, Gemma post-norm);
    the logits' final norm, unembedding and soft-capping. Everything else runs normally.

    Raises:
        ValueError: a malformed node or channel, an edge the graph lacks (receiver not
            after sender), a position out of range, an edge given twice, or
            ``base_ids`` and ``source_ids`` of different shapes.
    """
    if base_ids.shape != source_ids.shape:
        raise ValueError(f"base shape {tuple(base_ids.shape)} != source shape {tuple(source_ids.shape)}")
    _check_edges(model, edges, base_ids.shape[1])
    source = reference_contributions(model, source_ids) if edges else {}
    return _edge_run(model, base_ids, edges, source)[0]


# --------------------------------------------------------------------------- path patching


def _mlp_branch(model: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP branch of ``layer`` computed from the residual ``x`` it reads, by direct calls."""
    block = _block(model, layer)
    out = block.mlp.forward(block.get_submodule(_NORMS[model.config.model_type][1]).forward(x))
    return block.post_feedforward_layernorm.forward(out) if model.config.model_type in _GEMMA else out


def reference_path_patched_logits(
    model: nn.Module,
    base_ids: torch.LongTensor,
    source_ids: torch.LongTensor,
    senders: list[tuple],
    receivers: list[tuple[tuple, str]] | str,
    *,
    freeze_mlps: bool = False,
) -> torch.Tensor:
    """Path patching (Wang et al. 2022, arXiv 2211.00593): final-position logits ``[b, vocab]``.

    1. Cache every head's ``z`` (out-proj input) and MLP branch output in the base and
       source runs.
    2. Run the base input with each sender at its source value (head: its ``z`` slice;
       MLP: its branch output), every other head's ``z`` frozen at its base value, MLPs
       recomputed (or frozen at base with ``freeze_mlps``; a sender MLP keeps its source
       value), and record each receiver's input: a head's q/k/v projection output slice
       (key/value head for k/v), the residual an MLP's pre-norm reads, the last block's
       output for "logits".
    3. Run the base input with only those recorded inputs patched in (an MLP receiver's
       branch is recomputed from its recorded residual), and return the logits.

    Gemma's post-attention norm is applied to the mixed attention output of step 2, so
    on Gemma a single head's path effect is not its edge effect.

    Raises:
        ValueError: a malformed sender (embed is not a sender here) or receiver, a
            sender that does not come before every receiver ("receivers must come after
            senders"), or ``base_ids`` and ``source_ids`` of different shapes.
    """
    if base_ids.shape != source_ids.shape:
        raise ValueError(f"base shape {tuple(base_ids.shape)} != source shape {tuple(source_ids.shape)}")
    if isinstance(receivers, str) and receivers != "logits":
        raise ValueError(f"receivers must be 'logits' or a list of (node, channel), got {receivers!r}")
    receivers = [(LOGITS, "in")] if receivers == "logits" else list(receivers)
    for node in senders:
        _check_sender(model, node, embed=False)
    for node, channel in receivers:
        _check_receiver(model, node, channel)
        for s in senders:
            if not feeds(model, s, node):
                raise ValueError(f"receivers must come after senders: {s!r} does not feed {node!r}")

    n_layers, parallel = _n_layers(model), is_parallel(model)
    sites = [(site, layer) for layer in range(n_layers) for site in ("head", "mlp_out")]
    base = reference_cache(model, base_ids, sites)
    source = reference_cache(model, source_ids, sites)

    patches = []
    for layer in range(n_layers):
        z = base[("head", layer)].clone()
        for s in senders:
            if s[0] == "head" and s[1] == layer:
                z[:, :, s[2]] = source[("head", layer)][:, :, s[2]]
        patches.append(RefPatch("head", layer, None, None, z))
        if ("mlp", layer) in senders:
            patches.append(RefPatch("mlp_out", layer, None, None, source[("mlp_out", layer)]))
        elif freeze_mlps:
            patches.append(RefPatch("mlp_out", layer, None, None, base[("mlp_out", layer)]))

    def site_of(node: Node, channel: str) -> tuple[str, int]:
        if node[0] == "head":
            return channel, node[1]
        if node[0] == "mlp":
            return ("resid_pre" if parallel else "resid_mid"), node[1]
        return "resid_post", n_layers - 1

    read = sorted({site_of(node, channel) for node, channel in receivers}, key=lambda s: (s[1], s[0]))
    recorded = reference_cache(model, base_ids, read, patches=patches)

    final = []
    for node, channel in receivers:
        value = recorded[site_of(node, channel)]
        if node[0] == "head":
            final.append(RefPatch(channel, node[1], node[2], None, value))
        elif node[0] == "mlp":
            with torch.no_grad():
                final.append(RefPatch("mlp_out", node[1], None, None, _mlp_branch(model, node[1], value)))
        else:
            final.append(RefPatch("resid_post", n_layers - 1, None, None, value))
    return reference_patched_logits(model, base_ids, final)


# --------------------------------------------------------------------------- multi-hop path patching


def _receiver_site(model: nn.Module, node: Node, channel: str) -> tuple[str, int]:
    """The ``(site, layer)`` of tests/reference.py holding the input a receiver channel reads."""
    if node[0] == "head":
        return channel, node[1]
    if node[0] == "mlp":
        return ("resid_pre" if is_parallel(model) else "resid_mid"), node[1]
    return "resid_post", _n_layers(model) - 1


def reference_multihop_path_patched_logits(
    model: nn.Module,
    base_ids: torch.LongTensor,
    source_ids: torch.LongTensor,
    senders: list[tuple],
    hops: list[list[tuple[tuple, str]]],
    receivers: list[tuple[tuple, str]] | str,
    *,
    freeze_mlps: bool = False,
) -> torch.Tensor:
    """Multi-hop path patching (Wang et al. 2022, arXiv 2211.00593): final-position logits ``[b, vocab]``.

    The path ``senders -> hops[0] -> ... -> hops[-1] -> receivers``; each hop is a list of
    head channels ``(("head", L, h), "q" | "k" | "v")`` (for k/v on grouped-query models
    ``h`` is the key/value head). Every head's ``z`` and MLP branch output is cached in the
    base and source runs, then:

    1. Base input; senders at their source value (head ``z`` slice / MLP branch output);
       every other head's ``z`` frozen at base; MLPs recomputed, or with ``freeze_mlps``
       frozen at base (a sender MLP keeping its source value). Record the inputs of
       ``hops[0]``: each head's q/k/v projection output slice.
    2. For each later hop, and once more for the receivers: base input; the previous hop's
       recorded inputs patched in; the previous hop's heads compute their ``z`` from them
       (a k/v channel frees every query head of its key/value group); every other head's
       ``z`` frozen at base, senders included; MLPs recomputed, or with ``freeze_mlps``
       frozen at base (senders included: the sender's effect travels only through the
       recorded hop inputs). Record the next hop's inputs, or the receivers' inputs as in
       `reference_path_patched_logits` (projection slice, the residual an MLP's pre-norm
       reads, the last block's output for "logits").
    3. Base input with only the receivers' recorded inputs patched in (an MLP receiver's
       branch recomputed from its recorded residual); return the logits.

    With ``hops=[]`` this is `reference_path_patched_logits`.

    Raises:
        ValueError: a malformed sender, hop channel (heads and q/k/v only) or receiver;
            an empty hop; a hop head not strictly after every sender or every head of the
            previous hop ("must come after"); a receiver the last hop (or, without hops,
            a sender) does not feed; or ``base_ids`` and ``source_ids`` of different shapes.
    """
    if base_ids.shape != source_ids.shape:
        raise ValueError(f"base shape {tuple(base_ids.shape)} != source shape {tuple(source_ids.shape)}")
    if isinstance(receivers, str) and receivers != "logits":
        raise ValueError(f"receivers must be 'logits' or a list of (node, channel), got {receivers!r}")
    receivers = [(LOGITS, "in")] if receivers == "logits" else list(receivers)
    hops = [list(hop) for hop in hops]
    for node in senders:
        _check_sender(model, node, embed=False)
    for i, hop in enumerate(hops, 1):
        if not hop:
            raise ValueError(f"hop {i} is empty")
        for node, channel in hop:
            if not (isinstance(node, tuple) and len(node) == 3 and node[0] == "head"):
                raise ValueError(f"hop {i}: a hop holds head channels ((\"head\", L, h), q|k|v), got {node!r}")
            _check_receiver(model, node, channel)
    for node, channel in receivers:
        _check_receiver(model, node, channel)
    previous, what = list(senders), "senders"
    for i, hop in enumerate(hops, 1):
        for node, _ in hop:
            for p in previous:
                if not feeds(model, p, node):
                    raise ValueError(f"hop {i} must come after the {what}: {p!r} does not feed {node!r}")
        previous, what = [node for node, _ in hop], f"hop {i}"
    for node, _ in receivers:
        for p in previous:
            if not feeds(model, p, node):
                raise ValueError(f"receivers must come after {what}: {p!r} does not feed {node!r}")

    n_layers = _n_layers(model)
    n_heads, n_kv, _ = _dims(model)
    group = n_heads // n_kv
    sites = [(site, layer) for layer in range(n_layers) for site in ("head", "mlp_out")]
    base = reference_cache(model, base_ids, sites)
    source = reference_cache(model, source_ids, sites)

    def node_patches(first: bool, free: set[tuple[int, int]]) -> list[RefPatch]:
        """Head z frozen (senders at source in the first pass; heads in ``free`` left to
        compute), MLPs frozen or left to recompute."""
        out = []
        for layer in range(n_layers):
            z = base[("head", layer)].clone()
            if first:
                for s in senders:
                    if s[0] == "head" and s[1] == layer:
                        z[:, :, s[2]] = source[("head", layer)][:, :, s[2]]
            keep = [h for h in range(n_heads) if (layer, h) not in free]
            if len(keep) == n_heads:
                out.append(RefPatch("head", layer, None, None, z))
            else:
                out += [RefPatch("head", layer, h, None, z) for h in keep]
            if first and ("mlp", layer) in senders:
                out.append(RefPatch("mlp_out", layer, None, None, source[("mlp_out", layer)]))
            elif freeze_mlps:
                out.append(RefPatch("mlp_out", layer, None, None, base[("mlp_out", layer)]))
        return out

    def read_sites(channels: list[tuple[Node, str]]) -> list[tuple[str, int]]:
        return sorted({_receiver_site(model, n, c) for n, c in channels}, key=lambda s: (s[1], s[0]))

    # Pass 1: senders patched; record hop 1 (or the receivers).
    stages = hops + [receivers]
    recorded = reference_cache(model, base_ids, read_sites(stages[0]), patches=node_patches(True, set()))
    # Passes 2..k+1: the previous hop's inputs patched in, its heads free.
    for hop, nxt in zip(stages[:-1], stages[1:]):
        patches, free = [], set()
        for (_, layer, h), channel in hop:
            patches.append(RefPatch(channel, layer, h, None, recorded[(channel, layer)]))
            free |= {(layer, h)} if channel == "q" else {(layer, g) for g in range(h * group, (h + 1) * group)}
        recorded = reference_cache(model, base_ids, read_sites(nxt), patches=patches + node_patches(False, free))

    final = []
    for node, channel in receivers:
        value = recorded[_receiver_site(model, node, channel)]
        if node[0] == "head":
            final.append(RefPatch(channel, node[1], node[2], None, value))
        elif node[0] == "mlp":
            with torch.no_grad():
                final.append(RefPatch("mlp_out", node[1], None, None, _mlp_branch(model, node[1], value)))
        else:
            final.append(RefPatch("resid_post", n_layers - 1, None, None, value))
    return reference_patched_logits(model, base_ids, final)
