"""The runner: plans activation patching on the client and runs it as one program.

`patch_rows` evaluates a metric with many patch sets at once. Row ``r`` of a
sweep patches the components ``rows[r]`` with the source run's values into the
base run. Rows are laid out along the batch (batch index = row * n_prompts +
prompt) and each hook point gets one vectorised ``torch.where`` write.

The cache passes of the runs and every patched pass form one program
(`patchlab.kernels.patching`) run by `patchlab.remote.execute`: one session here,
or one remote request; the caches stay where the model is. Work that cannot
change is not recomputed: a chunk whose earliest patch is at layer ``L`` skips
blocks ``0..L-1`` (their output is the base run's cached residual stream
entering ``L``), and only the final position's logits are computed
(``logits_to_keep=1``).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .components import Component, Site, as_index
from .kernels import patching as kpatching
from .metrics import Metric, Targets, check_gap
from .models import PatchModel
from .remote import execute, resolve_remote

__all__ = ["CachePass", "PatchResult", "patch_rows", "rows_per_chunk", "chunk_rows", "chunk_progress", "pass_specs",
           "gather_chunks", "check_range", "check_components", "checked_gap"]


@dataclass(frozen=True)
class CachePass:
    """One forward pass that caches runs stacked along the batch.

    Attributes:
        names: the runs, in batch order (e.g. ``("clean", "corrupted")``).
        ids: their tokens, ``[run * prompt, pos]``.
        noise: start from run ``noise["from"]``'s block-0 input plus ``noise["eps"]``
            (``[prompt, n, d_model]``) at positions ``noise["start"] ..`` (causal tracing).
    """

    names: tuple[str, ...]
    ids: torch.Tensor
    noise: dict | None = field(default=None)


@dataclass(frozen=True)
class PatchResult:
    """Metric values of `patch_rows`: ``values`` ``[row, prompt]`` and each run's own ``runs[name]`` ``[prompt]``."""

    values: torch.Tensor
    runs: dict[str, torch.Tensor]


def patch_rows(model: PatchModel, *, passes: Sequence[CachePass], base: str, source: str, base_ids: torch.Tensor,
               rows: Sequence[tuple[Component, ...]], metric: Metric, targets: Targets, kl_from: str = "clean",
               base_embeds: bool = False, max_rows: int | None = None, memory_mb: float = 1024,
               progress: bool = True, remote=None, gap: tuple[str, str] | None = None) -> PatchResult:
    """Metric of the base run with each row's components patched from the source run.

    Caching the runs and every patched pass form one program (`patchlab.kernels.patching`):
    one session here, one request remotely.

    Args:
        passes: the cache passes that create the runs (the base and source among them).
        base, source: names of the run patched into and of the run the values come from.
        base_ids: the base run's tokens, ``[prompt, pos]``.
        rows: one tuple of components per row.
        metric: evaluated on the final position's logits; `targets` per prompt
            (``[prompt]``); KL compares with run `kl_from`.
        max_rows / memory_mb: chunk size: at most `max_rows` rows per forward pass,
            else as many as an estimate of activation memory allows.
        base_embeds: the base run starts from its cached block-0 input (e.g. noised
            embeddings), not from its tokens' embeddings.
        remote: see `patchlab.remote` (None: the model's default).
        gap: two runs whose metric gap the caller normalises by (e.g. ``("clean", "corrupted")``);
            the program stops before its sweep if it is too small (`patchlab.metrics.check_gap`).

    Returns:
        `PatchResult`: ``values`` ``[row, prompt]`` and each run's metric.

    Raises:
        ValueError: a component the model or the prompts do not have, or a bad `memory_mb`.
        patchlab.metrics.BaselineGapError: see `gap`.
    """
    n_prompts, n_pos = base_ids.shape
    check_components(model, dict.fromkeys(c for row in rows for c in row), n_pos)
    limit = max_rows or rows_per_chunk(model, n_prompts, n_pos, memory_mb)
    starts = [_start_layer(model, row) for row in rows]
    chunks = chunk_rows(starts, limit)
    sites = {(Site.RESID_PRE, layer) for layer in set(starts) | {0}} | {(c.site, c.layer) for row in rows for c in row}
    spec = {"arch": model.arch(), "base": base, "source": source, "base_ids": base_ids,
            "base_embeds": base_embeds, "metric": metric.value, "kl_from": kl_from, "gap": gap,
            "targets": {"correct": targets.correct, "incorrect": targets.incorrect},
            "runs": pass_specs(passes, sites),
            "chunks": [{"start": starts[chunk[0]], "n_rows": len(chunk),
                        "writes": _plan_writes(model, [rows[r] for r in chunk], n_prompts, n_pos)} for chunk in chunks]}
    with chunk_progress(model, remote, len(chunks), "patching", progress) as update:
        out = execute(model, kpatching.patch_program, spec, update, remote=remote)
    checked_gap(out["runs"], gap, metric)
    return PatchResult(values=gather_chunks(chunks, out["values"], n_prompts),
                       runs={k: v.cpu() for k, v in out["runs"].items()})


def checked_gap(runs: dict, gap: tuple[str, str] | None, metric: Metric) -> None:
    """`patchlab.metrics.check_gap` on the runs `gap` names, if any (after a program that may
    have stopped for it)."""
    if gap is not None:
        check_gap(runs[gap[0]], runs[gap[1]], metric, names=gap)


def check_range(dim: str, values: Sequence | None, size: int) -> list[int]:
    """`values` (None: all of ``0..size-1``) as ints in ``0..size-1``.

    Raises:
        TypeError: a value that is not an integer (see `patchlab.components.as_index`).
        ValueError: a value out of range, or no values.
    """
    values = list(range(size)) if values is None else [as_index(v, dim) for v in values]
    bad = [v for v in values if not 0 <= v < size]
    if bad or not values:
        raise ValueError(f"{dim} values {bad or values} out of range: the model/dataset has {size} "
                         f"({dim} 0..{size - 1})")
    return values


def check_components(model: PatchModel, components, n_pos: int) -> None:
    """Refuse components the model or the prompts do not have.

    Raises:
        ValueError: a layer, head or position out of range (the message gives the range), or
            ``resid_mid`` on a parallel-residual model.
    """
    for c in components:
        check_range(f"layer of {c.label}", [c.layer], model.layout.n_layers)
        if c.head is not None:
            check_range(f"head of {c.label} ({c.site.value})", [c.head], model.layout.n_heads_at(c.site))
        if c.pos is not None:
            check_range(f"pos of {c.label}", c.pos, n_pos)
        if c.site is Site.RESID_MID and not model.adapter.has_resid_mid(model.hf.config):
            raise ValueError(f"{model.adapter.family} uses a parallel residual: resid_mid does not exist; "
                             "patch attn_out or mlp_out instead")


@contextmanager
def chunk_progress(model: PatchModel, remote, total: int, desc: str, enabled: bool = True):
    """A progress bar over a program's forward passes: yields its ``update`` when the program
    runs here, None remotely (a bar cannot travel; nnsight shows the request's status)."""
    if not enabled or resolve_remote(remote, model.remote) is not None:
        yield None
        return
    with tqdm(total=total, desc=desc, unit="pass", leave=False) as bar:
        yield bar.update


def pass_specs(passes: Sequence[CachePass], sites) -> list[dict]:
    """The cache passes as the plain dicts kernel programs read, each caching `sites`
    (``(Site, layer)`` pairs) in forward order."""
    values = sorted({(site.value, layer) for site, layer in sites}, key=lambda sl: (sl[1], sl[0]))
    return [{"names": p.names, "ids": p.ids, "sites": values, "noise": p.noise} for p in passes]


def gather_chunks(chunks: Sequence[list[int]], parts: Sequence[torch.Tensor], n_prompts: int,
                  lead: int | None = None) -> torch.Tensor:
    """The per-chunk metric values of a program, ``[lead *] (row * prompt)`` each, put back in row
    order: ``[row, prompt]`` (or ``[lead, row, prompt]``), in the dtype the metric was computed in
    (float64 for a float64 model; at least float32)."""
    n_rows = sum(len(chunk) for chunk in chunks)
    shape = (n_rows, n_prompts) if lead is None else (lead, n_rows, n_prompts)
    dtype = parts[0].dtype if parts else torch.float32
    values = torch.empty(shape, dtype=dtype)
    for chunk, v in zip(chunks, parts):
        v = v.cpu().reshape(*shape[:-2], len(chunk), n_prompts)
        values[..., chunk, :] = v
    return values


def chunk_rows(start_layers: Sequence[int], limit: float, weights: Sequence[float] | None = None) -> list[list[int]]:
    """Row indices grouped into chunks that share a start layer, so that every chunk
    can skip the blocks below it, with at most `limit` rows (or total `weights`:
    the memory of a row in units of one plain row)."""
    chunks: list[list[int]] = []
    load = 0.0
    for r in sorted(range(len(start_layers)), key=lambda r: start_layers[r]):
        w = 1.0 if weights is None else weights[r]
        if chunks and load + w <= limit and start_layers[chunks[-1][0]] == start_layers[r]:
            chunks[-1].append(r)
            load += w
        else:
            chunks.append([r])
            load = w
    return chunks


def rows_per_chunk(model: PatchModel, n_prompts: int, n_pos: int, memory_mb: float) -> int:
    """Rows per forward pass that keep a rough estimate of activation memory under `memory_mb`.

    Raises:
        ValueError: `memory_mb` is not a finite number > 0.
    """
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, numbers.Real) or not math.isfinite(memory_mb) \
            or memory_mb <= 0:
        raise ValueError(f"memory_mb must be a finite number of MiB > 0 (activation memory per forward pass; "
                         f"default 1024), got {memory_mb!r}")
    lay = model.layout
    bytes_per_sequence = 4 * n_pos * (16 * lay.d_model + 3 * lay.n_heads * n_pos) + 4 * 2 * lay.vocab_size
    return max(1, math.floor(memory_mb * 2**20 / (bytes_per_sequence * n_prompts)))


def _start_layer(model: PatchModel, row: tuple[Component, ...]) -> int:
    return min(model.adapter.write_point(c.site, c.layer).layer for c in row)


def _plan_writes(model: PatchModel, rows, n_prompts: int, n_pos: int) -> list:
    """``[(hook point, [(site, mask [row * prompt, pos(, head)], layer), ...]), ...]`` in forward order."""
    layout = model.layout
    n_rows = len(rows)
    masks: dict[tuple[Site, int], torch.Tensor] = {}
    for r, row in enumerate(rows):
        for c in row:
            key = (c.site, c.layer)
            if key not in masks:
                shape = (n_rows, n_prompts, n_pos) + ((layout.n_heads_at(c.site),) if c.site.per_head else ())
                masks[key] = torch.zeros(shape, dtype=torch.bool)
            pos = slice(None) if c.pos is None else list(c.pos)
            if c.site.per_head:
                masks[key][r, :, pos, c.head] = True
            else:
                masks[key][r, :, pos] = True
    writes = defaultdict(list)
    for (site, layer), mask in sorted(masks.items(), key=lambda kv: (kv[0][1], kv[0][0].order)):
        if site is Site.RESID_MID:
            writes[model.adapter.point(Site.RESID_PRE, layer)]  # read the block input for resid_mid
        writes[model.adapter.write_point(site, layer)].append((site.value, mask.flatten(0, 1), layer))
    return [((p.layer, p.path, p.io, p.rank), entries) for p, entries in sorted(writes.items(), key=lambda kv: kv[0].sort_key)]
