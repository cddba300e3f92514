"""The runner: the only module that opens nnsight traces for patching.

Two operations:

- `cache_runs`: one forward pass over several runs (clean, corrupted) that
  records every requested activation in canonical shape, plus the final
  position's logits.
- `patch_rows`: evaluate a metric with many patch sets at once. Row ``r`` of a
  sweep patches the components ``rows[r]`` with the source run's values into the
  base run. Rows are laid out along the batch (batch index = row * n_prompts +
  prompt) and each hook point gets one vectorised ``torch.where`` write.

Work that cannot change is not recomputed: a chunk whose earliest patch is at
layer ``L`` skips blocks ``0..L-1`` (their output is the base run's cached
residual stream entering ``L``), and only the final position's logits are
computed (``logits_to_keep=1``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from .adapters import HookPoint
from .components import Component, Site
from .metrics import Metric, Targets
from .models import PatchModel

__all__ = ["RunCache", "cache_runs", "patch_rows", "rows_per_chunk", "chunk_rows", "skip_value"]


@dataclass(frozen=True)
class RunCache:
    """Activations of one run.

    Attributes:
        acts: ``{(site, layer): tensor}`` in canonical shape, ``[prompt, pos, d_model]``
            or ``[prompt, pos, head, d_head]``.
        logits: final-position logits, ``[prompt, vocab]``.
    """

    acts: dict[tuple[Site, int], torch.Tensor]
    logits: torch.Tensor


def cache_runs(model: PatchModel, runs: Sequence[torch.Tensor], sites: Iterable[tuple[Site, int]], *,
               embeds: torch.Tensor | None = None) -> list[RunCache]:
    """Run several token batches (each ``[prompt, pos]``, same shape) in one forward pass.

    Args:
        embeds: the residual stream entering block 0 for all runs together,
            ``[run * prompt, pos, d_model]``, instead of the tokens' embeddings (e.g.
            noised embeddings for causal tracing).

    Returns one `RunCache` per run with the activations at `sites`.
    """
    ids = torch.cat(list(runs)).to(model.device)
    sites = set(sites)
    if embeds is not None:
        sites.add((Site.RESID_PRE, 0))
    by_point: dict[HookPoint, list[Site]] = defaultdict(list)
    for site, layer in sorted(set(sites), key=lambda sl: (sl[1], sl[0].order)):
        by_point[model.adapter.point(site, layer)].append(site)
    adapter, layout, nn = model.adapter, model.layout, model.nn
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1):
        store = nnsight.save({})
        for point in sorted(by_point, key=lambda p: p.sort_key):
            if embeds is not None and point == adapter.point(Site.RESID_PRE, 0):
                adapter.block(nn, 0).input = embeds.to(model.device)
            raw = _first(_read(adapter.module(nn, point), point))
            for site in by_point[point]:
                store[(site, point.layer)] = adapter.view(site, raw, layout).clone()
        store["logits"] = nn.output.logits[:, -1].clone()
    n = runs[0].shape[0]
    return [RunCache(acts={k: v[i * n:(i + 1) * n] for k, v in store.items() if k != "logits"},
                     logits=store["logits"][i * n:(i + 1) * n]) for i in range(len(runs))]


def patch_rows(model: PatchModel, *, base_ids: torch.Tensor, base: RunCache, source: RunCache,
               rows: Sequence[tuple[Component, ...]], metric: Metric, targets: Targets,
               max_rows: int | None = None, memory_mb: float = 1024, progress: bool = True,
               base_embeds: bool = False) -> torch.Tensor:
    """Metric of the base run with each row's components patched from the source run.

    Args:
        base_ids: the run patched into, ``[prompt, pos]``.
        base: its cache; must hold ``resid_pre`` at every layer that a row starts at.
        source: the cache of the run the patched values come from; must hold
            every (site, layer) that the rows patch.
        rows: one tuple of components per row.
        metric: evaluated on the final position's logits.
        targets: per-prompt targets, ``[prompt]``.
        max_rows / memory_mb: chunk size: at most `max_rows` rows per forward pass,
            else as many as an estimate of activation memory allows.
        base_embeds: the base run is defined by its cached block-0 input (``resid_pre``
            at layer 0, e.g. noised embeddings), not by its tokens' embeddings.

    Returns:
        Metric values, ``[row, prompt]``.
    """
    n_prompts = base_ids.shape[0]
    limit = max_rows or rows_per_chunk(model, n_prompts, base_ids.shape[1], memory_mb)
    chunks = chunk_rows([_start_layer(model, row) for row in rows], limit)
    out = torch.empty(len(rows), n_prompts)
    for chunk in tqdm(chunks, desc="patching", unit="pass", disable=not progress, leave=False):
        logits = _run_chunk(model, base_ids, base, source, [rows[r] for r in chunk], base_embeds)
        values = metric(logits, targets.repeat(len(chunk)))
        out[chunk] = values.reshape(len(chunk), n_prompts).cpu()
    return out


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
    """Rows per forward pass that keep a rough estimate of activation memory under `memory_mb`."""
    lay = model.layout
    bytes_per_sequence = 4 * n_pos * (16 * lay.d_model + 3 * lay.n_heads * n_pos) + 4 * 2 * lay.vocab_size
    return max(1, math.floor(memory_mb * 2**20 / (bytes_per_sequence * n_prompts)))


def skip_value(model: PatchModel, base: RunCache, start: int, n_rows: int):
    """What skipped blocks ``0..start-1`` return: the base run's residual stream entering `start`."""
    if start == 0:
        return None
    value = base.acts[(Site.RESID_PRE, start)].repeat(n_rows, 1, 1).to(model.device)
    return (value,) + (None,) * (model.block_output_arity - 1) if model.block_output_arity else value


def _start_layer(model: PatchModel, row: tuple[Component, ...]) -> int:
    return min(model.adapter.write_point(c.site, c.layer).layer for c in row)


def _run_chunk(model: PatchModel, base_ids, base: RunCache, source: RunCache,
               rows: Sequence[tuple[Component, ...]], base_embeds: bool = False) -> torch.Tensor:
    adapter, layout, nn = model.adapter, model.layout, model.nn
    n_rows, (n_prompts, n_pos) = len(rows), base_ids.shape
    writes = _plan_writes(model, source, rows, n_prompts, n_pos)
    start = min(p.layer for p in writes)
    embed_point = adapter.point(Site.RESID_PRE, 0)
    if base_embeds and start == 0:
        writes.setdefault(embed_point, [])
    ids = base_ids.repeat(n_rows, 1).to(model.device)
    skip_to = skip_value(model, base, start, n_rows)
    with torch.no_grad(), nn.trace(ids, logits_to_keep=1):
        for layer in range(start):
            adapter.block(nn, layer).skip(skip_to)
        resid_pre = None
        for point in sorted(writes, key=lambda p: p.sort_key):
            module = adapter.module(nn, point)
            value = _read(module, point)
            raw = _first(value)
            new = raw
            if base_embeds and point == embed_point:
                new = base.acts[(Site.RESID_PRE, 0)].repeat(n_rows, 1, 1).to(raw.device)
            for site, mask, src in writes[point]:
                if site is Site.RESID_MID:
                    current = resid_pre + new
                    new = new + torch.where(mask[..., None], src - current, torch.zeros_like(new))
                else:
                    view = adapter.view(site, new, layout)
                    new = adapter.unview(site, new, torch.where(mask[..., None], src, view), layout)
            _write(module, point, value, new)
            if point.io == "input" and point.path == "":
                resid_pre = new
        logits = nnsight.save(nn.output.logits[:, -1])
    return logits


def _plan_writes(model: PatchModel, source: RunCache, rows, n_prompts: int, n_pos: int):
    """``{hook point: [(site, mask [batch, pos(, head)], source values [batch, pos, ...]), ...]}``."""
    adapter, layout = model.adapter, model.layout
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
    writes: dict[HookPoint, list] = defaultdict(list)
    for (site, layer), mask in sorted(masks.items(), key=lambda kv: (kv[0][1], kv[0][0].order)):
        if site is Site.RESID_MID:
            writes[adapter.point(Site.RESID_PRE, layer)]  # read the block input for resid_mid
        src = source.acts[(site, layer)]
        src = src.repeat(n_rows, *([1] * (src.dim() - 1))).to(model.device)
        writes[adapter.write_point(site, layer)].append((site, mask.flatten(0, 1).to(model.device), src))
    return writes


def _read(module, point: HookPoint):
    return module.output if point.io == "output" else module.input


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _write(module, point: HookPoint, value, new) -> None:
    if new is _first(value):
        return
    if point.io == "input":
        module.input = new
    else:
        module.output = (new, *value[1:]) if isinstance(value, tuple) else new
