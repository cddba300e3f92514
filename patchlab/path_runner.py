"""Runner for path patching (Wang et al. 2022, "Interpretability in the Wild", arXiv 2211.00593).

For each row's sender set, two forward passes over the batch (one row per
sender set):

1. the base input, with every sender set to its source value (a head's output
   z, an MLP's output), every other head's output frozen to its base value and
   MLPs recomputed (or frozen too, ``freeze_mlps``); the receivers' inputs are
   recorded: the q/k/v projection slice of each receiver head (key/value head for
   k and v on grouped-query models), the residual stream an MLP reads, or the
   final residual stream for the logits;
2. the base input with only those recorded receiver inputs patched in; the
   metric is read from its final position.

`path_patch_rows` plans on the client (receivers as plain tuples, senders as
masks) and runs the caching of the base and source runs and every pass as one
program (`patchlab.kernels.paths.path_program`): one session here, one request
remotely. Blocks below the first sender (pass 1) and below the first receiver
(pass 2) are skipped, fed the base run's cached residual stream; blocks after the
last receiver are skipped in pass 1.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .components import Site
from .graph import Channel, Node, NodeKind
from .kernels import patching as kpatching
from .kernels import paths as kpaths
from .metrics import Metric, Targets
from .models import PatchModel
from .remote import execute
from .chunking import chunk_rows, gather_chunks, rows_per_chunk
from .runner import CachePass, PatchResult, checked_gap, chunk_progress, pass_specs, run_masks

__all__ = ["path_cache_sites", "cache_path_runs", "path_patch_rows"]


def path_cache_sites(model: PatchModel) -> set[tuple[Site, int]]:
    """The (site, layer) activations the base and source caches need."""
    return {(s, layer) for layer in range(model.layout.n_layers) for s in (Site.RESID_PRE, Site.HEAD, Site.MLP_OUT)}


def cache_path_runs(model: PatchModel, passes: Sequence[CachePass]) -> dict:
    """The runs' path caches (`path_cache_sites`), computed here (one session) to pass as ``acts=``
    to several `path_patch_rows` calls on the same runs. Local models only: remotely each request
    computes its own caches (shipping them would cost megabytes per request)."""
    return execute(model, kpatching.cache_runs, model.arch(), pass_specs(passes, path_cache_sites(model)), remote=False)


def path_patch_rows(model: PatchModel, *, passes: Sequence[CachePass], base: str, source: str,
                    base_ids: torch.Tensor, rows: Sequence[Sequence[Node]],
                    receiver_sets: Sequence[Sequence[tuple[Node, Channel]]], metric: Metric, targets: Targets,
                    kl_from: str = "clean", hops: Sequence[Sequence[tuple[Node, Channel]]] = (),
                    freeze_mlps: bool = False, memory_mb: float = 1024, progress: bool = True,
                    acts: dict | None = None, remote=None, gap: tuple[str, str] | None = None) -> PatchResult:
    """Metric of the base run after path patching each row's senders into each receiver set.

    Pass 1 does not depend on the receivers, so it runs once per chunk of rows and
    records the inputs of every receiver of every set; pass 2 runs once per set.
    Caching the runs and every pass form one program (`patchlab.kernels.paths`).

    Args:
        passes: the cache passes that create the runs (the base and source among them); left-padded
            passes (`CachePass.mask`) need each base prompt of its source prompt's length.
        base, source: names of the run patched into and of the run the senders' values come from.
        base_ids: the base run's tokens, ``[prompt, pos]``.
        rows: one set of sender nodes (heads and/or MLPs) per row.
        receiver_sets: sets of (node, channel) pairs: head q (query heads), k/v
            (key/value heads on grouped-query models), MLP "in", or the logits.
        metric: evaluated on the final position's logits; `targets` per prompt
            (``[prompt]``); KL compares with run `kl_from`.
        hops: intermediate receiver sets for multi-hop paths (sender -> hop 1 ->
            ... -> receivers), head q/k/v channels only: each hop's inputs are
            recorded with the previous hop's inputs patched in and only the
            previous hop's heads live, every other head frozen.
        freeze_mlps: freeze MLPs to their base values too (a variant; default
            recomputes them, as in the paper).
        acts: the runs' caches from `cache_path_runs` (local runs that share runs);
            None: computed inside the program.
        remote: see `patchlab.remote`; this costs 1 request (caches, passes and metric together).
        gap: two runs whose metric gap the caller normalises by; the program stops before the
            sweep if it is too small.

    Returns:
        `PatchResult`: ``values`` ``[set, row, prompt]`` and each run's metric ``runs[name]`` ``[prompt]``.

    Raises:
        ValueError: a sender that is not a head or MLP, a node the model does not have, or a
            receiver that does not come after every sender.
        patchlab.metrics.BaselineGapError: see `gap`.
    """
    receiver_sets = [list(dict.fromkeys(rs)) for rs in receiver_sets]
    stages = [list(dict.fromkeys(h)) for h in hops] + [list(dict.fromkeys(r for rs in receiver_sets for r in rs))]
    _check(model, rows, stages)
    n_prompts, n_pos = base_ids.shape
    first_receiver = min(_layer(model, node) for node, _ in stages[0])
    starts = [min((s.layer for s in row), default=first_receiver) for row in rows]
    chunks = chunk_rows(starts, rows_per_chunk(model, n_prompts, n_pos, memory_mb))
    spec = {"arch": model.arch(), "runs": pass_specs(passes, path_cache_sites(model)), "base": base, "source": source,
            "masks": run_masks(passes), "base_ids": base_ids, "metric": metric.spec, "kl_from": kl_from,
            "freeze_mlps": freeze_mlps, "gap": gap,
            "targets": {"correct": targets.correct, "incorrect": targets.incorrect},
            "stages": _stages(model, stages),
            "receiver_sets": [{"receivers": _receivers(model, rs), "start": min(_layer(model, n) for n, _ in rs)}
                              for rs in receiver_sets],
            "chunks": [{"n_rows": len(chunk), "start": starts[chunk[0]],
                        **_sender_masks(model, [rows[r] for r in chunk], n_prompts)} for chunk in chunks]}
    with chunk_progress(model, remote, len(chunks), "path patching", progress) as update:
        out = execute(model, kpaths.path_program, spec, update, acts, remote=remote)
    checked_gap(out["runs"], gap, metric)
    return PatchResult(values=gather_chunks(chunks, out["values"], n_prompts, lead=len(receiver_sets)),
                       runs={k: v.cpu() for k, v in out["runs"].items()})


def _check(model: PatchModel, rows, stages) -> None:
    """Refuse nodes the model does not have, senders that are not heads or MLPs, and stages that
    do not come after the previous one."""
    lay = model.layout
    heads = {NodeKind.HEAD: lay.n_heads, NodeKind.KV_HEAD: lay.n_kv_heads}
    for node in {n for row in rows for n in row} | {n for stage in stages for n, _ in stage}:
        if node.layer is not None and node.layer >= lay.n_layers or node.head is not None and \
                node.head >= heads[node.kind]:
            raise ValueError(f"{node.label} is not a node of this model: it has layers 0..{lay.n_layers - 1}, "
                             f"{lay.n_heads} heads and {lay.n_kv_heads} key/value heads per layer")
    for before, after in zip(stages, stages[1:]):
        if any(c.site is None for _, c in before) or \
                max(n.layer for n, _ in before) >= min(_layer(model, n) for n, _ in after):
            raise ValueError("each hop must be head q/k/v inputs in layers before every receiver of the next stage")
    resid_mid = model.arch()["has_resid_mid"]
    for row in rows:
        for s in row:
            if s.kind not in (NodeKind.HEAD, NodeKind.MLP):
                raise ValueError(f"path patching senders are heads or MLPs, got {s.label}")
            late = [n.label for n, _ in stages[0] if _layer(model, n) < s.layer or
                    (_layer(model, n) == s.layer and not (n.kind is NodeKind.MLP and s.kind is NodeKind.HEAD
                                                         and resid_mid))]
            if late:
                raise ValueError(f"receivers {late} do not come after sender {s.label}: "
                                 "receivers must read the residual stream after every sender writes to it")


def _layer(model: PatchModel, node: Node) -> int:
    return model.layout.n_layers if node.kind is NodeKind.LOGITS else node.layer


def _stages(model: PatchModel, stages) -> list[dict]:
    """Pass 1, then each hop: its receivers; a hop's pass starts at the previous stage's first layer,
    with the previous stage's heads live."""
    specs = [{"receivers": _receivers(model, stages[0])}]
    for before, stage in zip(stages, stages[1:]):
        specs.append({"receivers": _receivers(model, stage), "start": min(n.layer for n, _ in before),
                      "live": _live(model, before)})
    return specs


def _receivers(model: PatchModel, receivers) -> list[tuple]:
    """Receivers as the kernel's tuples: ``(q|k|v, layer, head)``, ``("mlp_in", layer, None)``,
    ``("logits", n_layers, None)``."""
    out = []
    for node, channel in receivers:
        if node.kind is NodeKind.LOGITS:
            out.append(("logits", model.layout.n_layers, None))
        elif channel.site is not None:
            out.append((channel.value, node.layer, node.head))
        elif node.kind is NodeKind.MLP:
            out.append(("mlp_in", node.layer, None))
    return out


def _live(model: PatchModel, hop) -> torch.Tensor:
    """``[layer, head]`` bool: the query heads that read a hop's inputs (a key/value head's whole group)."""
    lay = model.layout
    live = torch.zeros(lay.n_layers, lay.n_heads, dtype=torch.bool)
    group = lay.n_heads // lay.n_kv_heads
    for node, channel in hop:
        if channel is Channel.Q or node.kind is NodeKind.HEAD:
            live[node.layer, node.head] = True
        else:
            live[node.layer, node.head * group:(node.head + 1) * group] = True
    return live


def _sender_masks(model: PatchModel, rows, n_prompts: int) -> dict:
    """``heads`` ``[row * prompt, layer, head]`` and ``mlps`` ``[row * prompt, layer]``: each row's senders."""
    lay = model.layout
    heads = torch.zeros(len(rows), lay.n_layers, lay.n_heads, dtype=torch.bool)
    mlps = torch.zeros(len(rows), lay.n_layers, dtype=torch.bool)
    for r, row in enumerate(rows):
        for s in row:
            if s.kind is NodeKind.HEAD:
                heads[r, s.layer, s.head] = True
            else:
                mlps[r, s.layer] = True
    return {"heads": heads.repeat_interleave(n_prompts, dim=0), "mlps": mlps.repeat_interleave(n_prompts, dim=0)}
