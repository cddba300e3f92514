"""How a sweep's rows are cut into forward passes: chunks that share a start layer and a first
column, within a memory budget, left-padded prompts in length groups, and the chunks' values put
back in row order. Plain client-side planning (`patchlab.runner.run_rows` and the graph and path
runners use it); nothing here opens a trace."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Sequence

import torch

from .models import PatchModel

__all__ = ["MAX_BUCKETS", "PASS_COST", "PASS_TOKENS", "length_buckets", "rows_per_chunk", "chunk_rows",
           "column_chunks", "gather_chunks"]


MAX_BUCKETS = 4
"""At most this many length groups per chunk of rows (`length_buckets`)."""
PASS_COST = 0.05
"""The cost of one more forward pass, as a fraction of the whole padded batch's tokens."""


def length_buckets(lengths: torch.Tensor, width: int, max_buckets: int | None = None,
                   pass_cost: float | None = None) -> list[tuple[torch.Tensor, int]] | None:
    """Prompts of a left-padded batch grouped by length where that saves padded compute:
    ``[(prompt indices, first column)]``, each group padded only to its own longest prompt (its
    first column ``width - longest``), or None when one pass is cheapest.

    The prompts are sorted by length and cut into at most `max_buckets` (default `MAX_BUCKETS`) runs
    that minimise the tokens computed plus `pass_cost` (default `PASS_COST`) times the batch's tokens
    for every extra pass (dynamic programming, deterministic); `bench/bench_padding.py` measures the
    saving. Every group computes the same values as the whole batch: only padding is left out.
    """
    max_buckets = MAX_BUCKETS if max_buckets is None else max_buckets
    pass_cost = PASS_COST if pass_cost is None else pass_cost
    order = sorted(range(len(lengths)), key=lambda p: (int(lengths[p]), p))
    n = [int(lengths[p]) for p in order]
    count, penalty = len(n), pass_cost * len(n) * width
    best = {(0, 0): (0.0, [])}  # (prompts placed, groups used) -> (cost, cut points)
    for k in range(1, max_buckets + 1):
        for j in range(1, count + 1):
            options = [(best[(i, k - 1)][0] + (j - i) * n[j - 1] + (k > 1) * penalty, best[(i, k - 1)][1] + [j])
                       for i in range(j) if (i, k - 1) in best]
            if options:
                best[(j, k)] = min(options, key=lambda o: o[0])
    _, cuts = min((best[(count, k)] for k in range(1, max_buckets + 1) if (count, k) in best), key=lambda o: o[0])
    if len(cuts) == 1:
        return None
    groups, start = [], 0
    for end in cuts:
        members = sorted(order[start:end])
        groups.append((torch.tensor(members, dtype=torch.long), width - n[end - 1]))
        start = end
    return groups


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


PASS_TOKENS = 64
"""What one more forward pass costs, in tokens of compute: a pass reads every weight of the blocks it
runs once, whatever its batch (measured on a 2-core CPU, GPT-2 small: ~60 ms a pass plus ~1.3 ms a
token, `bench/bench_peers.py`). `column_chunks` merges rows of nearby first columns while a merge
costs fewer recomputed tokens than this."""


def column_chunks(starts: Sequence[int], cols: Sequence[int], limit: int, n_prompts: int,
                  width: int) -> list[list[int]]:
    """Rows grouped into chunks that share a start layer, each running from the first column of its
    rows (`first_columns`), at most `limit` rows each.

    Within a start layer, rows are sorted by first column and cut into runs of consecutive columns
    that minimise the estimated cost, ``PASS_TOKENS`` per pass plus ``n_prompts * (width - column)``
    tokens per row (a dynamic program over the distinct columns); a run becomes as few chunks of at
    most `limit` rows as it needs.
    """
    by_layer: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r, (layer, col) in enumerate(zip(starts, cols)):
        by_layer[layer][col].append(r)
    chunks: list[list[int]] = []
    for layer in sorted(by_layer):
        columns = sorted(by_layer[layer])
        counts = [len(by_layer[layer][c]) for c in columns]
        best = [0.0] + [math.inf] * len(columns)  # best[j]: cost of the first j columns
        cut = [0] * (len(columns) + 1)
        for j in range(1, len(columns) + 1):
            n = 0
            for i in range(j, 0, -1):  # the last run: columns i-1 .. j-1, from column columns[i-1]
                if counts[j - 1] * n_prompts * (columns[j - 1] - columns[i - 1]) > \
                        math.ceil(counts[j - 1] / limit) * PASS_TOKENS:
                    break  # column j-1 alone would cost less than it wastes here, and runs further left waste more
                n += counts[i - 1]
                cost = best[i - 1] + math.ceil(n / limit) * PASS_TOKENS + n * n_prompts * (width - columns[i - 1])
                if cost < best[j]:
                    best[j], cut[j] = cost, i - 1
        runs, j = [], len(columns)
        while j:
            runs.append(columns[cut[j]:j])
            j = cut[j]
        for run in reversed(runs):
            members = [r for c in run for r in by_layer[layer][c]]
            chunks += [members[k:k + limit] for k in range(0, len(members), limit)]
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
