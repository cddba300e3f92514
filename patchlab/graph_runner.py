"""Runner for graph-level patching: exact, batched edge patching in nnsight traces.

Edge patching (Conmy et al. 2023; auto-circuit's convention): in the patched
forward pass, a receiver channel with patched incoming edges reads

    x_{r,c} = x_r + sum over its patched edges (s -> r.c) of (out_s(source) - out_s(current))

where ``x_r`` is the residual stream the receiver reads in this (patched) pass,
``out_s(current)`` the sender's contribution in this pass and ``out_s(source)``
its contribution in the unpatched source run. Token-specific edges apply at their
position only. The receiver is then recomputed exactly: a head channel from the
block's input norm and its q/k/v projection (only that head's or key/value head's
slice is replaced), an MLP from its own pre-norm, the logits from the final norm.
Everything downstream follows. The batch holds one edge set per row.

Large edge sets (circuit evaluation, ACDC) use the complement: the residual
stream is the sum of all sender contributions plus constants (biases), so a
channel with most of its edges patched reads the source run's residual plus
``out_s(current) - out_s(source)`` of its few unpatched edges, and a channel with
all edges patched reads the source residual (for a head: the source run's q/k/v
slice). Both forms are exact; the cost follows the smaller set.

Sender contributions: the embeddings (block 0's input); a head's output through
its slice of the output projection, without the bias (which belongs to no
sender); an MLP's output as added to the residual stream. Gemma's post-attention
norm is split over heads with the norm scale of the whole attention output of
the same pass, so the contributions still sum to the branch output.

The client plans (which receivers each row patches, in which form, chunked by the
layer they can start at) and sends plain-data chunk specs to one program,
`patchlab.kernels.edges.edge_program`, which caches the clean and corrupted runs
and evaluates every chunk: one session here, one request remotely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ._choices import check_choice
from .components import Site
from .data import TokenizedPairs
from .edge_plan import EdgePlanner
from .graph import Edge, Graph
from .kernels import edges as kedges
from .kernels import patching as kpatching
from .metrics import Direction, Metric, get_metric
from .models import PatchModel
from .patching import pair_targets, require_paired_lengths, run_pair
from .remote import execute, resolve_remote
from .chunking import chunk_rows, gather_chunks, rows_per_chunk
from .runner import checked_gap, chunk_progress, pass_specs, run_masks

__all__ = ["ABLATIONS", "graph_cache_sites", "edge_patch_rows", "local_graph_cache", "EdgeResult"]

ABLATIONS = ("resample", "mean")
"""What a patched edge carries: the source run's values, or their mean over prompts."""


def graph_cache_sites(model: PatchModel) -> set[tuple[Site, int]]:
    """The (site, layer) activations a source cache needs for edge patching."""
    n = model.layout.n_layers
    sites = {(s, layer) for layer in range(n) for s in (Site.RESID_PRE, Site.HEAD, Site.MLP_OUT)}
    if model.adapter.has_resid_mid(model.hf.config):
        sites |= {(Site.RESID_MID, layer) for layer in range(n)}
    return sites | {(Site.RESID_POST, n - 1)}


@dataclass(frozen=True)
class EdgeResult:
    """Metric values of `edge_patch_rows`.

    Attributes:
        values: ``[row, prompt]``, the metric of each patched row.
        metric, direction: as used.
        clean, corrupted: the unpatched runs' metric, ``[prompt]``.
    """

    values: torch.Tensor
    metric: Metric
    direction: Direction
    clean: torch.Tensor
    corrupted: torch.Tensor

    @property
    def baselines(self) -> dict:
        """``{"metric", "direction", "clean", "corrupted"}``, as `patchlab.patching.result_dataset` reads them."""
        return {"metric": self.metric, "direction": self.direction, "clean": self.clean, "corrupted": self.corrupted}


def local_graph_cache(model: PatchModel, tokens: TokenizedPairs, remote=None) -> dict | None:
    """The clean and corrupted runs' activation cache for repeated `edge_patch_rows` calls
    (``acts=``), made once here; None when running remotely (each request then caches
    inside, rather than shipping activations back and forth).

    remote: see `patchlab.remote`; this costs no request (one forward pass here).
    """
    if resolve_remote(remote, model.remote) is not None:
        return None
    return execute(model, kpatching.cache_runs, model.arch(), pass_specs([run_pair(tokens)], graph_cache_sites(model)),
                   remote=False)


def edge_patch_rows(model: PatchModel, graph: Graph, *, tokens: TokenizedPairs, rows: Sequence[Sequence[Edge]],
                    metric: Metric | str, direction: Direction | str = Direction.NOISING,
                    ablation: str = "resample", acts: dict | None = None, memory_mb: float = 1024,
                    progress: bool = True, remote=None, gap: tuple[str, str] | None = ("clean", "corrupted"),
                    planner: EdgePlanner | None = None) -> EdgeResult:
    """Metric of the base run with each row's edge set patched from the source run.

    Caching the clean and corrupted runs and every patched pass form one program
    (`patchlab.kernels.edges.edge_program`). A chunk whose earliest changed sender is at
    layer L skips blocks ``0..L-1``, fed the base run's residual stream.

    Args:
        tokens: the clean and corrupted prompts, ``[prompt, pos]``; left-padded prompts of different
            lengths are fine when each clean prompt has its corrupted prompt's length. Padding is never
            patched; a token-specific edge's ``pos`` is a batch column (``pos - n_pos`` from the end).
        rows: one set of edges of `graph` per row (any size, up to every edge).
        direction: noising patches corrupted values into the clean run, denoising the reverse.
        ablation: "resample" (the source run's values) or "mean" (their mean over prompts,
            per position, over real tokens of left-padded prompts; for Gemma's post-normed heads,
            the contribution of the mean head output).
        acts: `local_graph_cache` of these tokens, to skip caching the runs (local only).
        remote: see `patchlab.remote`; this costs 1 request.
        gap: the runs whose metric gap must allow normalising (default the clean and corrupted
            ones; None: no check); the program stops before the sweep if it does not.

    Returns:
        `EdgeResult`: ``values`` ``[row, prompt]`` and the clean and corrupted metric.

    Raises:
        patchlab.metrics.BaselineGapError: see `gap`.
        ValueError: an unknown `ablation` (the message lists them).
        ValueError: an edge that is not in `graph` (a sender that the receiver does not read,
            or a channel it does not have); a `planner` of another graph or prompt width.
    """
    metric, direction = get_metric(metric), Direction(direction)
    check_choice(ablation, "ablation", ABLATIONS)
    base, source = ("clean", "corrupted") if direction is Direction.NOISING else ("corrupted", "clean")
    base_ids = tokens.clean_ids if base == "clean" else tokens.corrupted_ids
    n_prompts, n_pos = base_ids.shape
    if planner is None:
        planner = EdgePlanner(model, graph, n_pos)
    elif not planner.matches(graph, n_pos):
        raise ValueError("this EdgePlanner plans another graph or prompt width; make one per graph and tokens")
    rows = [planner.check(row) for row in rows]
    summaries = [planner.summary(row) for row in rows]
    starts = [start for start, _, _ in summaries]
    weights = [1 + n_terms / 8 for _, _, n_terms in summaries]  # a correction term costs ~1/8 of a row's activations
    chunks = chunk_rows(starts, rows_per_chunk(model, n_prompts, n_pos, memory_mb), weights)
    targets = pair_targets(tokens)
    require_paired_lengths(tokens, "edge patching")
    passes = [run_pair(tokens)]
    spec = {"arch": model.arch(), "runs": pass_specs(passes, graph_cache_sites(model)), "base": base, "source": source,
            "ablation": ablation, "base_ids": base_ids, "metric": metric.spec, "kl_from": "clean", "gap": gap,
            "masks": run_masks(passes),
            "targets": {"correct": targets.correct, "incorrect": targets.incorrect},
            "chunks": [{"start": starts[chunk[0]], "n_rows": len(chunk),
                        "keys": planner.keys([rows[r] for r in chunk], [summaries[r][1] for r in chunk])}
                       for chunk in chunks]}
    with chunk_progress(model, remote, len(chunks), "edge patching", progress) as update:
        out = execute(model, kedges.edge_program, spec, acts, update, remote=remote)
    checked_gap(out["runs"], gap, metric)
    return EdgeResult(values=gather_chunks(chunks, out["values"], n_prompts), metric=metric, direction=direction,
                      clean=out["runs"]["clean"].cpu(), corrupted=out["runs"]["corrupted"].cpu())
