"""Iterative path patching: a circuit of heads grown backwards from the logits.

Wang et al. 2022, "Interpretability in the Wild" (arXiv 2211.00593), found the
IOI circuit by hand in this way: path-patch every head to the logits, keep the
heads with a large direct effect, path-patch every earlier head to those heads'
q, k and v, keep the large ones, and so on. `iterative_path_patching` automates
the walk with a threshold:

- step 0: every head -> logits (`patchlab.paths.path_patch_heads`, direct path);
- step d >= 1: for each receiver head found at step d - 1 and each channel,
  every earlier head -> that channel. On grouped-query models k and v go to the
  key/value head of the receiver's group (``NodeKind.KV_HEAD``, as in
  `patchlab.graph.Graph`), swept once per group however many of its query heads
  are receivers;
- a sender whose ``|normalised score| >= threshold`` gives a circuit edge; senders
  not found before become the receivers of the next step.

Only head senders are path-patched, as in the paper: the graph's edges from the
embeddings and from MLPs are neither scored nor in the circuit (treat them as
present), so `Circuit.connected()`, which looks for paths from the embeddings,
returns an empty circuit here. A path effect is measured with every other head
frozen, so it is not an edge-patching effect (`patchlab.edges`) and scores do
not add up along paths. The walk makes no random choices (ties are broken in
forward order): a run is deterministic given the model, data and arguments.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from ._io import atomic_write_text
from .circuit import Circuit, edge_scores
from .data import PromptPairDataset
from .graph import Channel, Edge, Graph, Node, NodeKind
from .metrics import Direction, Metric, get_metric, score_formula
from .models import PatchModel, takes_model
from .patching import tokenize_for
from .paths import path_caches, path_patch_heads
from .provenance import provenance_attrs
from .remote import resolve_remote

__all__ = ["iterative_path_patching"]

_FORMAT = 1
_LOGITS = Node(NodeKind.LOGITS)


@takes_model
def iterative_path_patching(model: PatchModel, dataset: PromptPairDataset, *, threshold: float = 0.1,
                            max_depth: int = 3, max_receivers_per_step: int | None = None,
                            channels: Iterable[str | Channel] = ("q", "k", "v"), metric: Metric | str = Metric.LOGIT_DIFF,
                            direction: Direction | str = Direction.NOISING, freeze_mlps: bool = True,
                            seed: int | None = None, progress: bool = True,
                            checkpoint: str | os.PathLike | None = None, remote=None) -> Circuit:
    """Grow a circuit of heads from the logits by path patching (Wang et al. 2022, arXiv 2211.00593).

    Args:
        threshold: keep an edge when ``|normalised score| >= threshold``, the
            normalised score of `path_patch_heads` (``score``):
            ``(m_clean - m_patched) / (m_clean - m_corrupted)`` for noising,
            ``(m_patched - m_corrupted) / (m_clean - m_corrupted)`` for denoising
            (means over prompts), i.e. the path effect as a fraction of the
            clean-corrupted gap (0.1: a tenth of the gap, either sign).
        max_depth: number of path-patching steps, step 0 (heads -> logits)
            included; 1 sweeps the direct effects only.
        max_receivers_per_step: expand at most this many of the heads found at a
            step (largest ``|normalised score|`` first, ties in forward order;
            layer-0 heads have no senders and are never expanded); the others
            stay circuit nodes with no incoming edges (None: all; -1 in attrs).
        channels: receiver-head input channels swept at steps >= 1 ("q", "k", "v").
        metric, direction, seed: as in `patchlab.patch_layer_pos`; path patching
            is deterministic, `seed` (the dataset's) is recorded in attrs.
        freeze_mlps: freeze MLPs on the path too (default here), as
            `path_patch_heads`; False recomputes them.
        progress: show tqdm bars over steps and receivers.
        checkpoint: a JSON file. After each receiver's sweep the sweeps so far are
            written to it (atomically); a rerun with the same file reuses them and
            sweeps only the receivers not yet done. Only the settings that change
            a sweep's values must match; the walk (threshold, max_depth,
            max_receivers_per_step) is redone from the saved sweeps, so a
            checkpoint can be extended with a lower threshold or more depth.
        remote: see `patchlab.remote`; this costs 1 request for step 0 (every
            head -> logits) plus 1 per receiver swept at a later step (its q, k
            and v together); sweeps found in the checkpoint cost none. Each
            request caches the clean and corrupted runs itself; here they are
            cached once for the whole walk.

    Returns:
        A `Circuit` of ``Graph.from_model(model)`` whose scores (`edge_scores`)
        cover every path-patched (sender, receiver, channel) edge: ``score`` (edge),
        the path effect ``m_patched - m_base`` (prompt means, metric units; base =
        clean for noising, corrupted for denoising), ``normalised`` (edge, the
        score the threshold applies to) and ``depth`` (edge, the step that swept
        it). Edges go from heads to the logits (``in``), to heads (``q``) and to
        heads or key/value heads (``k``, ``v``). Attrs: method, metric, units,
        direction, threshold, max_depth, freeze_mlps, baselines and provenance.
        ``Circuit.threshold(scores, tau)`` uses metric units: tau = threshold *
        |clean_mean - corrupted_mean| gives the same edges.

    Raises:
        ValueError: a bad threshold, depth, cap or channel; a checkpoint made with another
            model, dataset, metric, direction, freeze_mlps or channels.
        patchlab.metrics.BaselineGapError: clean and corrupted runs without a gap to normalise by.
    """
    metric, direction = get_metric(metric), Direction(direction)
    channels = tuple(dict.fromkeys(Channel(c) for c in channels))
    if not channels or Channel.IN in channels:
        raise ValueError(f"channels must be a non-empty subset of q, k, v, got {[c.value for c in channels]}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite fraction >= 0 of the clean-corrupted gap, got {threshold}")
    if max_depth < 1 or (max_receivers_per_step is not None and max_receivers_per_step < 1):
        raise ValueError(f"max_depth ({max_depth}) and max_receivers_per_step ({max_receivers_per_step}) must be >= 1")
    graph, lay = Graph.from_model(model), model.layout
    pad_attrs = tokenize_for(model, dataset, paired="iterative path patching").pad_attrs()
    group, kv_kind = lay.n_heads // lay.n_kv_heads, NodeKind.KV_HEAD if graph.gqa else NodeKind.HEAD
    common = dict(metric=metric, direction=direction, freeze_mlps=freeze_mlps, seed=seed)
    config = {"model_sha256": model.weights_sha256, "dataset_sha256": dataset.sha256(), "metric": metric.value,
              "direction": direction.value, "freeze_mlps": bool(freeze_mlps), "channels": [c.value for c in channels]}
    cache = _load(checkpoint, config)

    @functools.cache
    def caches() -> dict | None:  # the runs' caches, computed once here; remotely each request computes its own
        return path_caches(model, dataset) if resolve_remote(remote, model.remote) is None else None

    def targets(head: Node) -> list[tuple[Node, Channel]]:  # the receiver channels of a head's sweep
        kv = Node(kv_kind, head.layer, head.head // group)
        return list(dict.fromkeys((head if c is Channel.Q else kv, c) for c in channels))

    def sweep(receiver: Node, todo: list[tuple[Node, Channel]]) -> None:
        """Path-patch every earlier head into these channels of one receiver (head, or the logits),
        unless the checkpoint has them; store ``[edge label, path effect, normalised]`` rows."""
        todo = [t for t in todo if _key(*t) not in cache["sweeps"]]
        if not todo:
            return
        if receiver == _LOGITS:
            ds = path_patch_heads(model, dataset, receivers="logits", progress=progress, caches=caches(),
                                  remote=remote, **common)
            cache["baselines"] = {"clean": float(ds.clean.mean()), "corrupted": float(ds.corrupted.mean())}
        else:
            ds = path_patch_heads(model, dataset, receivers=[receiver], channels=[c.value for _, c in todo],
                                  progress=progress, caches=caches(), remote=remote, **common)
        base = ds.clean if direction is Direction.NOISING else ds.corrupted
        effect = ds.patched.mean("prompt") - base.mean("prompt")
        for node, channel in todo:
            sel = {} if receiver == _LOGITS else {"channel": channel.value}
            cache["sweeps"][_key(node, channel)] = [
                (Edge(Node(NodeKind.HEAD, layer, head), node, channel).label,
                 float(effect.sel(**sel, layer=layer, head=head)), float(ds.score.sel(**sel, layer=layer, head=head)))
                for layer in range(_layer(node, lay.n_layers)) for head in range(lay.n_heads)]
        if checkpoint is not None:
            atomic_write_text(checkpoint, json.dumps(cache, indent=1) + "\n")

    evaluated: dict[Edge, tuple[float, float, int]] = {}  # edge -> (path effect, normalised, depth)
    swept: set[tuple[Node, Channel]] = set()
    found: set[Node] = set()
    frontier = [_LOGITS]
    steps = tqdm(range(max_depth), desc="iterative path patching", unit="step", disable=not progress)
    for depth in steps:
        new: dict[Node, float] = {}  # head found at this step -> its largest |normalised| here
        for receiver in tqdm(frontier, desc=f"receivers at depth {depth}", unit="receiver",
                             disable=not progress, leave=False):
            todo = [(_LOGITS, Channel.IN)] if receiver == _LOGITS else [t for t in targets(receiver) if t not in swept]
            sweep(receiver, todo)
            swept.update(todo)
            for label, effect, normalised in (row for t in todo for row in cache["sweeps"][_key(*t)]):
                edge = Edge.from_label(label)
                evaluated[edge] = (effect, normalised, depth)
                if abs(normalised) >= threshold and edge.sender not in found:
                    new[edge.sender] = max(new.get(edge.sender, 0.0), abs(normalised))
        found |= set(new)
        receivable = [n for n in new if n.layer > 0]  # no head sends to layer 0
        frontier = sorted(receivable, key=lambda n: (-new[n], n.sort_key))[:max_receivers_per_step]
        if not frontier:
            break
    steps.close()

    edges = sorted(evaluated)
    effect, normalised, depth = (np.asarray([evaluated[e][i] for e in edges]) for i in range(3))
    base = cache["baselines"]
    attrs = provenance_attrs(
        model_id=model.model_id, model_sha256=model.weights_sha256, dataset_sha256=dataset.sha256(), seed=seed,
        git_path=Path(__file__).parent, method="iterative_path_patching", metric=metric.value, units=metric.units,
        direction=direction.value, threshold=float(threshold), max_depth=int(max_depth),
        max_receivers_per_step=-1 if max_receivers_per_step is None else int(max_receivers_per_step),
        channels=",".join(c.value for c in channels), freeze_mlps=int(freeze_mlps), **pad_attrs,
        score="path effect m_patched - m_base, prompt means; base = clean (noising) or corrupted (denoising)",
        normalised_formula=score_formula(direction), selection="|normalised| >= threshold",
        senders="attention heads only (embedding and MLP edges are not path-patched)",
        clean_mean=base["clean"], corrupted_mean=base["corrupted"], dataset=dataset.name,
        corruption=dataset.corruption, model_family=model.adapter.family)
    scores = edge_scores(edges, effect, graph=graph, attrs=attrs,
                         normalised=normalised, depth=depth.astype(np.int64))
    scores["normalised"].attrs.update(long_name="normalised path-patching score", units="1")
    circuit = [e for e, (_, norm, _) in evaluated.items() if abs(norm) >= threshold]
    return Circuit(graph, frozenset(circuit), scores)


def _layer(node: Node, n_layers: int) -> int:
    return n_layers if node.kind is NodeKind.LOGITS else node.layer


def _key(node: Node, channel: Channel) -> str:
    """A receiver channel's name in checkpoints: "logits", "L9H6.q", "L9KV2.k"."""
    return node.label if channel is Channel.IN else f"{node.label}.{channel.value}"


def _load(checkpoint: str | os.PathLike | None, config: dict) -> dict:
    """The saved sweeps of `checkpoint` ({"format", "config", "baselines", "sweeps"}), or an empty cache.

    ``sweeps`` maps a receiver channel ("logits", "L9H6.q", "L9KV2.k") to rows
    ``[sender -> receiver edge label, path effect, normalised score]``.
    """
    empty = {"format": _FORMAT, "config": config, "baselines": {}, "sweeps": {}}
    if checkpoint is None or not Path(checkpoint).exists():
        return empty
    saved = json.loads(Path(checkpoint).read_text(encoding="utf-8"))
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        raise ValueError(f"{checkpoint} is not an iterative path patching checkpoint (format {_FORMAT})")
    differ = sorted(k for k in config if saved["config"].get(k) != config[k])
    if differ:
        raise ValueError(f"checkpoint {checkpoint} was made with another configuration ({', '.join(differ)}: "
                         f"{[saved['config'].get(k) for k in differ]} there, {[config[k] for k in differ]} now); "
                         "use a new checkpoint path or delete this file")
    return saved
