"""The runner: plans node-level interventions on the client and runs them as one program.

`run_rows` is the one engine of node-level work: it evaluates a metric with many joint sets of
interventions (`patchlab.interventions`) at once. Row ``r`` of a sweep applies the joint set
``rows[r]`` to the base run. Rows are laid out along the batch (batch index = row * n_prompts +
prompt) and each hook point gets one vectorised write per kind of operation (set, scale, steer).
Activation patching sweeps, causal tracing and `patchlab.intervene` all build rows for it
(`patch_rows` is its activation-patching form).

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
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .components import Component, Site, as_index
from .interventions import SETTING, Ablate, Ablation, At, Freeze, Intervention, Patch, Scale, Steer, joint_set
from .kernels import patching as kpatching
from .metrics import Metric, MetricFunction, Targets, check_gap
from .models import PatchModel
from .remote import execute, resolve_remote, send_by_value

__all__ = ["CachePass", "PatchResult", "run_rows", "patch_rows", "resolve_row", "derangement", "rows_per_chunk",
           "chunk_rows", "chunk_progress", "pass_specs", "run_masks",
           "gather_chunks", "check_range", "check_components", "checked_gap"]


@dataclass(frozen=True)
class CachePass:
    """One forward pass that caches runs stacked along the batch.

    Attributes:
        names: the runs, in batch order (e.g. ``("clean", "corrupted")``).
        ids: their tokens, ``[run * prompt, pos]``.
        mask: for left-padded prompts, True on real tokens, ``[run * prompt, pos]``; None: no padding.
        noise: start from run ``noise["from"]``'s block-0 input plus ``noise["eps"]``
            (``[prompt, n, d_model]``) at positions ``noise["start"] ..`` (causal tracing).
    """

    names: tuple[str, ...]
    ids: torch.Tensor
    noise: dict | None = field(default=None)
    mask: torch.Tensor | None = field(default=None)


@dataclass(frozen=True)
class PatchResult:
    """Metric values of `run_rows`: ``values`` ``[row, prompt]`` and each run's own ``runs[name]`` ``[prompt]``."""

    values: torch.Tensor
    runs: dict[str, torch.Tensor]


def run_rows(model: PatchModel, *, passes: Sequence[CachePass], base: str, base_ids: torch.Tensor,
             rows: Sequence[Sequence[Intervention]], metric: Metric | MetricFunction, targets: Targets,
             names: Mapping[str, int] | None = None, kl_from: str = "clean", base_embeds: bool = False,
             max_rows: int | None = None, memory_mb: float = 1024, progress: bool = True, remote=None,
             gap: tuple[str, str] | None = None) -> PatchResult:
    """Metric of the base run with each row's joint set of interventions applied: the engine
    every node-level sweep builds rows for.

    Caching the runs and every intervened pass form one program (`patchlab.kernels.patching`):
    one session here, one request remotely. Each row's interventions combine as
    `patchlab.interventions` says (set, then scale, then steer, then user functions).

    Args:
        passes: the cache passes that create the runs (the base run and every source among them;
            mean and resample ablation read the ``corrupted`` run).
        base: name of the run intervened on; `base_ids` its tokens, ``[prompt, pos]``.
        rows: one joint set of `patchlab.interventions.Intervention` values per row.
        names: the dataset's named positions, for components that name them (``pos="S2"``).
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
        ValueError: a component the model or the prompts do not have, an unknown position name,
            conflicting interventions in a row, a steering vector of the wrong size, a run no pass
            creates, an `At` function with ``remote=``, or a bad `memory_mb`.
        patchlab.metrics.BaselineGapError: see `gap`.
    """
    n_prompts, n_pos = base_ids.shape
    rows = [resolve_row(row, names or {}, n_pos) for row in rows]
    check_components(model, dict.fromkeys(i.component for row in rows for i in row), n_pos)
    run_names = {name for p in passes for name in p.names}
    for row in rows:
        for i in row:
            _check_intervention(model, i, run_names | {base}, base, n_prompts, n_pos)
    remotely = resolve_remote(remote, model.remote) is not None
    if remotely and any(isinstance(i, At) for row in rows for i in row):
        raise ValueError("an At intervention runs a local Python function and cannot travel with remote=; express "
                         "it with Patch, Ablate, Steer, Scale or Freeze, or run it here (remote=False)")
    if isinstance(metric, MetricFunction):
        metric.check(model.layout.vocab_size, targets)
        if remotely:
            send_by_value(metric.fn)
    limit = max_rows or rows_per_chunk(model, n_prompts, n_pos, memory_mb)
    starts = [_start_layer(model, row) for row in rows]
    chunks = chunk_rows(starts, limit)
    sites = {(Site.RESID_PRE, layer) for layer in set(starts) | {0}} | \
        {(i.component.site, i.component.layer) for row in rows for i in row if _source(i, base)}
    masks = run_masks(passes)
    real = None if masks is None else masks[base]
    spec = {"arch": model.arch(), "base": base, "base_ids": base_ids,
            "base_embeds": base_embeds, "metric": metric.spec, "kl_from": kl_from, "gap": gap,
            "targets": {"correct": targets.correct, "incorrect": targets.incorrect},
            "runs": pass_specs(passes, sites), "base_mask": real, "masks": masks,
            "chunks": [{"start": starts[chunk[0]], "n_rows": len(chunk),
                        "writes": _plan_writes(model, [rows[r] for r in chunk], n_prompts, n_pos, base, real)}
                       for chunk in chunks]}
    with chunk_progress(model, remote, len(chunks), "patching", progress) as update:
        out = execute(model, kpatching.patch_program, spec, update, remote=remote)
    checked_gap(out["runs"], gap, metric)
    return PatchResult(values=gather_chunks(chunks, out["values"], n_prompts),
                       runs={k: v.cpu() for k, v in out["runs"].items()})


def patch_rows(model: PatchModel, *, source: str, rows: Sequence[tuple[Component, ...]], **kwargs) -> PatchResult:
    """`run_rows` with every component of each row patched from the `source` run (activation
    patching: `patchlab.interventions.Patch`)."""
    return run_rows(model, rows=[tuple(Patch(c, source=source) for c in row) for row in rows], **kwargs)


def resolve_row(row: Sequence[Intervention], names: Mapping[str, int], n_pos: int) -> tuple[Intervention, ...]:
    """A joint set with every position resolved to an index from the left (`Component.resolve`),
    refusing two setting interventions (`~patchlab.interventions.SETTING`) on one element.

    Raises:
        ValueError: an unknown name or out-of-range offset, or a conflict (the message names both).
    """
    out = tuple(i if not i.component.symbolic else replace(i, component=i.component.resolve(names, n_pos))
                for i in joint_set(row))
    setting: dict[tuple, list[Intervention]] = defaultdict(list)
    for i in out:
        if isinstance(i, SETTING):
            c = i.component
            key = (c.site, c.layer, c.head)
            for other in setting[key]:
                a, b = other.component.pos, c.pos
                if a is None or b is None or set(a) & set(b):
                    where = f"layer {c.layer}" + ("" if c.head is None else f" head {c.head}")
                    raise ValueError(f"{other.label} and {i.label} both set {c.site.value} at {where} at the same "
                                     "positions: a joint set may set each element once. Drop one, or give them "
                                     "disjoint positions (Scale and Steer combine with a setting intervention instead)")
            setting[key].append(i)
    return out


def _check_intervention(model: PatchModel, i: Intervention, runs: set, base: str, n_prompts: int, n_pos: int) -> None:
    c = i.component
    if c.site is Site.PATTERN:
        check_pattern_site(model)
        if isinstance(i, At):
            raise ValueError(f"{i.label}: an At function cannot see a pattern (its head outputs are written "
                             "before the pattern can be read); use Patch, Ablate, Scale, Steer or Freeze on it, or At "
                             "on the head site")
    if isinstance(i, Steer):
        name, width = (("key pos", n_pos) if c.site is Site.PATTERN else ("d_head", model.layout.d_head)
                       if c.site.per_head else ("d_model", model.layout.d_model))
        if i.vector.numel() != width:
            raise ValueError(f"{i.label}: the vector has {i.vector.numel()} entries; {c.site.value} needs "
                             f"[{name}] = [{width}]")
    source = _source(i, base)
    if source is not None and len(source) > 1 and source[1] not in runs:
        raise ValueError(f"{i.label} reads the {source[1]!r} run, which this experiment does not run "
                         f"(runs: {sorted(runs)})")
    if isinstance(i, Ablate) and i.seed is not None and n_prompts < 2:
        raise ValueError(f"{i.label}: resampling from another pair needs at least 2 prompt pairs, the dataset has "
                         f"{n_prompts}; drop seed= to resample from the same pair")


def check_pattern_site(model: PatchModel) -> None:
    """Refuse attention-pattern work on a model without eager attention (other kernels do not
    return the pattern).

    Raises:
        ValueError: the fix is ``load_model(..., attn_implementation="eager")``.
    """
    impl = getattr(model.hf.config, "_attn_implementation", None)
    if impl != "eager":
        raise ValueError(f"the attention pattern (site 'pattern') needs eager attention, but {model.model_id} runs "
                         f"{impl!r} attention, which does not return it; load the model with "
                         f"pl.load_model(..., attn_implementation='eager')")


def _source(i: Intervention, base: str) -> tuple | None:
    """Where a setting intervention's value comes from, as the kernel reads it (None: not a setting one):
    ``("run", name)``, ``("mean", name)``, ``("perm", name, seed)`` or ``("zero",)``."""
    if isinstance(i, Patch):
        return ("run", i.source.value)
    if isinstance(i, Freeze):
        return ("run", base)
    if isinstance(i, Ablate):
        if i.how is Ablation.ZERO:
            return ("zero",)
        if i.how is Ablation.MEAN:
            return ("mean", "corrupted")
        return ("run", "corrupted") if i.seed is None else ("perm", "corrupted", i.seed)
    return None


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded random permutation of ``0..n-1`` without fixed points (n >= 2): prompt ``p``
    takes prompt ``perm[p]``'s values."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not (perm == torch.arange(n)).any():
            return perm


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
    return [{"names": p.names, "ids": p.ids, "sites": values, "noise": p.noise, "mask": p.mask} for p in passes]


def run_masks(passes: Sequence[CachePass]) -> dict[str, torch.Tensor] | None:
    """Each run's attention mask (``[prompt, pos]``) from passes over left-padded prompts; None
    when no pass is padded."""
    if all(p.mask is None for p in passes):
        return None
    masks = {}
    for p in passes:
        mask = torch.ones_like(p.ids, dtype=torch.bool) if p.mask is None else p.mask.bool()
        n = len(mask) // len(p.names)
        masks.update({name: mask[i * n:(i + 1) * n] for i, name in enumerate(p.names)})
    return masks


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


def _start_layer(model: PatchModel, row: Sequence[Intervention]) -> int:
    return min(model.adapter.write_point(i.component.site, i.component.layer).layer for i in row)


def _plan_writes(model: PatchModel, rows: Sequence[Sequence[Intervention]], n_prompts: int, n_pos: int,
                 base: str, real: torch.Tensor | None = None) -> list:
    """``[(hook point, [(site, layer, ops), ...]), ...]`` in forward order; ``ops`` holds, over the batch
    ``[row * prompt, pos(, head)]``: ``set`` (``[(mask, source)]``), ``mul`` (factors, or None),
    ``add`` (``[(coefficients, vector)]``) and ``at`` (``[(fn, batch index, head, pos index)]``).
    `real` (``[prompt, pos]``, True on real tokens of left-padded prompts) keeps padding untouched."""
    layout = model.layout
    n_rows = len(rows)
    plans: dict[tuple[Site, int], dict] = {}
    for r, row in enumerate(rows):
        for i in row:
            c = i.component
            key = (c.site, c.layer)
            shape = (n_rows, n_prompts, n_pos) + ((layout.n_heads_at(c.site),) if c.site.per_head else ())
            plan = plans.setdefault(key, {"shape": shape, "set": {}, "mul": None, "add": {}, "at": []})
            index = (r, slice(None), slice(None) if c.pos is None else list(c.pos)) + \
                ((c.head,) if c.site.per_head else ())
            source = _source(i, base)
            if source is not None:
                plan["set"].setdefault(source, torch.zeros(shape, dtype=torch.bool))[index] = True
            elif isinstance(i, Scale):
                if plan["mul"] is None:
                    plan["mul"] = torch.ones(shape, dtype=torch.float64)
                plan["mul"][index] *= i.factor
            elif isinstance(i, Steer):
                coef, _ = plan["add"].setdefault(i.digest, (torch.zeros(shape, dtype=torch.float64), i.vector))
                coef[index] += i.scale
            elif isinstance(i, At):
                batch = torch.arange(r * n_prompts, (r + 1) * n_prompts)
                pos = torch.arange(n_pos) if c.pos is None else torch.tensor(c.pos)
                plan["at"].append((i.fn, batch, c.head, pos))
    if real is not None:
        for plan in plans.values():
            keep = real.reshape((1,) + tuple(real.shape) + (1,) * (len(plan["shape"]) - 3))
            plan["set"] = {source: mask & keep for source, mask in plan["set"].items()}
            if plan["mul"] is not None:
                plan["mul"] = torch.where(keep, plan["mul"], torch.ones(()))
            plan["add"] = {k: (coef * keep, vector) for k, (coef, vector) in plan["add"].items()}
    writes = defaultdict(list)
    for (site, layer), plan in sorted(plans.items(), key=lambda kv: (kv[0][1], kv[0][0].order)):
        if site is Site.RESID_MID:
            writes[model.adapter.point(Site.RESID_PRE, layer)]  # read the block input for resid_mid
        if site is Site.PATTERN:
            writes[model.adapter.point(Site.V, layer)]  # read the values a pattern weighs
        ops = {"set": [(mask.flatten(0, 1), _kernel_source(source, n_prompts)) for source, mask in plan["set"].items()],
               "mul": None if plan["mul"] is None else plan["mul"].flatten(0, 1),
               "add": [(coef.flatten(0, 1), vector) for coef, vector in plan["add"].values()],
               "at": plan["at"]}
        writes[model.adapter.write_point(site, layer)].append((site.value, layer, ops))
    return [((p.layer, p.path, p.io, p.rank), entries)
            for p, entries in sorted(writes.items(), key=lambda kv: kv[0].sort_key)]


def _kernel_source(source: tuple, n_prompts: int) -> tuple:
    return source[:2] + (derangement(n_prompts, source[2]),) if source[0] == "perm" else source
