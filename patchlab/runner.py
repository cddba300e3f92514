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

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .chunking import column_chunks, gather_chunks, length_buckets, rows_per_chunk
from .components import Component, Site, as_index
from .interventions import Ablate, Ablation, At, Freeze, Intervention, Patch, ProjectOut, Scale, Steer, joint_set
from .kernels import patching as kpatching
from .metrics import Metric, MetricFunction, Targets, check_gap
from .models import PatchModel
from .positions import ALIGNMENT_HELP, PromptPositions, RunPositions
from .remote import execute, resolve_remote, send_by_value

__all__ = ["CachePass", "PatchResult", "run_rows", "patch_rows", "derangement", "chunk_progress", "first_columns",
           "pass_specs", "run_masks", "plan_writes", "check_intervention", "value_source", "check_range",
           "check_components", "checked_gap"]


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
             positions: PromptPositions | None = None, kl_from: str = "clean", base_embeds: bool = False,
             max_rows: int | None = None, memory_mb: float = 1024, progress: bool = True, remote=None,
             gap: tuple[str, str] | None = None, length_groups: bool = True) -> PatchResult:
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
        positions: each run's prompt lengths and named positions (`patchlab.positions`), for left-padded
            prompts and components that give positions by name (``pos="S2"``) or from the end; None:
            no names, and the lengths the passes' masks give (no mask: ``base_ids``' length).
        metric: evaluated on the final position's logits; `targets` per prompt
            (``[prompt]``); KL compares with run `kl_from`.
        max_rows / memory_mb: chunk size: at most `max_rows` rows per forward pass,
            else as many as an estimate of activation memory allows.
        base_embeds: the base run starts from its cached block-0 input (e.g. noised
            embeddings), not from its tokens' embeddings.
        remote: see `patchlab.remote` (None: the model's default).
        gap: two runs whose metric gap the caller normalises by (e.g. ``("clean", "corrupted")``);
            the program stops before its sweep if it is too small (`patchlab.metrics.check_gap`).
        length_groups: run left-padded prompts of different lengths in groups of similar length
            where that saves padded compute (`length_buckets`); False: one pass over the whole batch.

    Returns:
        `PatchResult`: ``values`` ``[row, prompt]`` and each run's metric.

    Raises:
        ValueError: a component the model or the prompts do not have, an unknown position name, a
            position some prompt lacks, every position read from prompts of other lengths,
            conflicting interventions in a row, a steering vector of the wrong size, a run no pass
            creates, an `At` function with ``remote=``, or a bad `memory_mb`.
        patchlab.metrics.BaselineGapError: see `gap`.
    """
    n_prompts, n_pos = base_ids.shape
    run_names = {name for p in passes for name in p.names}
    masks = run_masks(passes)
    if positions is None and masks is None:
        positions = PromptPositions.uniform(sorted(run_names | {base}), n_prompts, n_pos)
    elif positions is None:  # no names; the lengths the passes' masks give
        positions = PromptPositions(runs={name: RunPositions(lengths=m.sum(1), width=n_pos, names={})
                                          for name, m in masks.items()})
    rows = [joint_set(row) for row in rows]
    check_components(model, dict.fromkeys(i.component for row in rows for i in row))
    for row in rows:
        for i in row:
            check_intervention(model, i, run_names | {base}, base, n_prompts, n_pos)
    remotely = resolve_remote(remote, model.remote) is not None
    if remotely and any(isinstance(i, At) for row in rows for i in row):
        raise ValueError("an At intervention runs a local Python function and cannot travel with remote=; express "
                         "it with Patch, Ablate, Steer, ProjectOut, Scale or Freeze, or run it here (remote=False)")
    if isinstance(metric, MetricFunction):
        metric.check(model.layout.vocab_size, targets)
        if remotely:
            send_by_value(metric.fn)
    limit = max_rows or rows_per_chunk(model, n_prompts, n_pos, memory_mb)
    starts = [_start_layer(model, row) for row in rows]
    cols = first_columns(rows, positions, base)
    chunks = column_chunks(starts, cols, limit, n_prompts, n_pos)
    chunk_cols = [min(cols[r] for r in chunk) for chunk in chunks]
    sites = {(Site.RESID_PRE, layer) for layer in set(starts) | {0}} | \
        {(i.component.site, i.component.layer) for row in rows for i in row if value_source(i, base)}
    spec = {"arch": model.arch(), "base": base, "base_ids": base_ids,
            "base_embeds": base_embeds, "metric": metric.spec, "kl_from": kl_from, "gap": gap,
            "targets": {"correct": targets.correct, "incorrect": targets.incorrect},
            "runs": pass_specs(passes, sites, kv=base if any(chunk_cols) else None),
            "base_mask": None if masks is None else masks[base], "masks": masks,
            "groups": length_buckets(positions[base].lengths, n_pos) if length_groups else None,
            "chunks": [{"start": starts[chunk[0]], "col": col, "n_rows": len(chunk),
                        "writes": plan_writes(model, [rows[r] for r in chunk], n_prompts, positions, base)}
                       for chunk, col in zip(chunks, chunk_cols)]}
    with chunk_progress(model, remote, len(chunks), "patching", progress) as update:
        out = execute(model, kpatching.patch_program, spec, update, remote=remote)
    checked_gap(out["runs"], gap, metric)
    return PatchResult(values=gather_chunks(chunks, out["values"], n_prompts),
                       runs={k: v.cpu() for k, v in out["runs"].items()})


def patch_rows(model: PatchModel, *, source: str, rows: Sequence[tuple[Component, ...]], **kwargs) -> PatchResult:
    """`run_rows` with every component of each row patched from the `source` run (activation
    patching: `patchlab.interventions.Patch`)."""
    return run_rows(model, rows=[tuple(Patch(c, source=source) for c in row) for row in rows], **kwargs)


def check_intervention(model: PatchModel, i: Intervention, runs: set, base: str, n_prompts: int, n_pos: int) -> None:
    c = i.component
    if c.site is Site.PATTERN:
        check_pattern_site(model)
        if isinstance(i, (At, ProjectOut)):
            raise ValueError(f"{i.label}: {'an At function' if isinstance(i, At) else 'ProjectOut'} cannot see a "
                             "pattern (its head outputs are written before the pattern can be read); use Patch, "
                             "Ablate, Scale, Steer or Freeze on it, or this on the head site")
    if isinstance(i, (Steer, ProjectOut)):
        vector = i.vector if isinstance(i, Steer) else i.direction
        name, width = (("key pos", n_pos) if c.site is Site.PATTERN else ("d_head", model.layout.d_head)
                       if c.site.per_head else ("d_model", model.layout.d_model))
        if vector.numel() != width:
            raise ValueError(f"{i.label}: the vector has {vector.numel()} entries; {c.site.value} needs "
                             f"[{name}] = [{width}]")
    source = value_source(i, base)
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


def value_source(i: Intervention, base: str) -> tuple | None:
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


def check_components(model: PatchModel, components) -> None:
    """Refuse components the model does not have (positions resolve per prompt, `patchlab.positions`).

    Raises:
        ValueError: a layer or head out of range (the message gives the range), or
            ``resid_mid`` on a parallel-residual model.
    """
    for c in components:
        check_range(f"layer of {c.label}", [c.layer], model.layout.n_layers)
        if c.head is not None:
            check_range(f"head of {c.label} ({c.site.value})", [c.head], model.layout.n_heads_at(c.site))
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


def pass_specs(passes: Sequence[CachePass], sites, kv: str | None = None) -> list[dict]:
    """The cache passes as the plain dicts kernel programs read, each caching `sites`
    (``(Site, layer)`` pairs) in forward order, and the pass of run `kv` its keys and values too
    (for passes over later positions only, `first_columns`)."""
    values = sorted({(site.value, layer) for site, layer in sites}, key=lambda sl: (sl[1], sl[0]))
    return [{"names": p.names, "ids": p.ids, "sites": values, "noise": p.noise, "mask": p.mask,
             "kv": DynamicCache if kv in p.names else None} for p in passes]


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


def first_columns(rows: Sequence[Sequence[Intervention]], positions: PromptPositions, base: str) -> list[int]:
    """Each row's first column of the base run that any of its interventions touches, over all prompts.

    Under the causal mask, the columns before it hold the base run's values in every layer, so a
    pass computes only the columns from there on and attends to the base run's cached keys and
    values before them (`patchlab.kernels.patching.patch_chunk`; sliding-window layers too: the
    cache keeps every key and the model's mask applies the window). 0 (every column) for a row that
    touches an attention pattern: a row over key positions, which the cached keys do not carry.
    """
    out = []
    for row in rows:
        if any(i.component.site is Site.PATTERN for i in row):
            out.append(0)
            continue
        out.append(min(int(_elements(positions[base], i.component, i.label, base)[1].min()) for i in row))
    return out


def _start_layer(model: PatchModel, row: Sequence[Intervention]) -> int:
    return min(model.adapter.write_point(i.component.site, i.component.layer).layer for i in row)


def plan_writes(model: PatchModel, rows: Sequence[Sequence[Intervention]], n_prompts: int,
                 positions: PromptPositions, base: str) -> list:
    """``[(hook point, [(site, layer, ops), ...]), ...]`` in forward order; ``ops`` holds, over the batch
    ``[row * prompt, pos(, head)]``: ``set`` (``[(mask, source)]``, see `_SetPlan`), ``proj``
    (``[(where, unit direction)]``, by digest), ``mul`` (factors, or None), ``add``
    (``[(coefficients, vector)]``) and ``at`` (``[(fn, batch index, head, pos index)]``).

    Each component's positions resolve per prompt (`patchlab.positions`), so only real tokens are
    ever written, and a value read from another run comes from that run's corresponding token.

    Raises:
        ValueError: positions a prompt lacks, an all-position read across prompts of different lengths,
            or two setting interventions on one element (the message names both).
    """
    layout, width = model.layout, positions.width
    n_rows = len(rows)
    plans: dict[tuple[Site, int], dict] = {}
    for r, row in enumerate(rows):
        for i in row:
            c = i.component
            shape = (n_rows, n_prompts, width) + ((layout.n_heads_at(c.site),) if c.site.per_head else ())
            plan = plans.setdefault((c.site, c.layer), {"shape": shape, "set": {}, "proj": {}, "mul": None, "add": {},
                                                        "at": [], "claims": {}})
            prompt, cols = _elements(positions[base], c, i.label, base)
            if c.site is Site.PATTERN:
                _check_pattern_keys(positions, i, base)
            index = (r, prompt, cols) + ((c.head,) if c.site.per_head else ())
            source = value_source(i, base)
            if source is not None:
                _claim(plan["claims"], index, shape, i)
                plan["set"].setdefault(source, _SetPlan(shape, width)).add(index, _source_columns(
                    positions, source, c, i.label, base, cols, n_prompts))
            elif isinstance(i, Scale):
                if plan["mul"] is None:
                    plan["mul"] = torch.ones(shape, dtype=torch.float64)
                plan["mul"][index] *= i.factor
            elif isinstance(i, ProjectOut):
                where, _ = plan["proj"].setdefault(i.digest, (torch.zeros(shape, dtype=torch.float64), i.direction))
                where[index] = 1.0
            elif isinstance(i, Steer):
                coef, _ = plan["add"].setdefault(i.digest, (torch.zeros(shape, dtype=torch.float64), i.vector))
                coef[index] += i.scale
            elif isinstance(i, At):
                for cols_p, prompts in _by_columns(prompt, cols).items():
                    plan["at"].append((i.fn, r * n_prompts + torch.tensor(prompts), c.head, torch.tensor(cols_p)))
    writes = defaultdict(list)
    for (site, layer), plan in sorted(plans.items(), key=lambda kv: (kv[0][1], kv[0][0].order)):
        if site is Site.RESID_MID:
            writes[model.adapter.point(Site.RESID_PRE, layer)]  # read the block input for resid_mid
        if site is Site.PATTERN:
            writes[model.adapter.point(Site.V, layer)]  # read the values a pattern weighs
        ops = {"set": [(sp.mask.flatten(0, 1), sp.kernel_source(source, n_prompts, positions))
                       for source, sp in plan["set"].items()],
               "proj": [(plan["proj"][k][0].flatten(0, 1), plan["proj"][k][1]) for k in sorted(plan["proj"])],
               "mul": None if plan["mul"] is None else plan["mul"].flatten(0, 1),
               "add": [(coef.flatten(0, 1), vector) for coef, vector in plan["add"].values()],
               "at": plan["at"]}
        writes[model.adapter.write_point(site, layer)].append((site.value, layer, ops))
    return [((p.layer, p.path, p.io, p.rank), entries)
            for p, entries in sorted(writes.items(), key=lambda kv: kv[0].sort_key)]


def _elements(run: RunPositions, c: Component, label: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The base run's elements a component covers, as flat ``(prompt, column)`` index vectors: its
    positions resolved per prompt, or every real token (``pos=None``)."""
    if c.pos is None:
        prompt, cols = torch.nonzero(run.real(), as_tuple=True)
        return prompt, cols
    cols = torch.stack([run.columns(p, label, name) for p in c.pos], dim=1)  # [prompt, k]
    return torch.arange(run.n_prompts).repeat_interleave(cols.shape[1]), cols.flatten()


def _source_columns(positions: PromptPositions, source: tuple, c: Component, label: str, base: str,
                    cols: torch.Tensor, n_prompts: int):
    """Where the source of a setting intervention reads each element: the source run's column
    (``run``/``perm``), the mean's column or named label (``mean``), or None (``zero``)."""
    if source[0] == "zero":
        return None
    run = positions[source[1]]
    if source[0] == "mean":
        if c.pos is None:
            empty = cols[run.real().sum(0)[cols] == 0]
            if len(empty):
                raise ValueError(f"{label}: no {source[1]} prompt reaches offset {int(empty[0]) - run.width} from the "
                                 f"end, so the mean there is undefined; give positions every {source[1]} prompt has")
            return ("column", cols)
        return ("label", [(p, run.columns(p, label, source[1])) for p in c.pos], c.pos)
    if source[1] == base and source[0] == "run":
        return ("column", cols)
    origin = torch.arange(n_prompts) if source[0] == "run" else derangement(n_prompts, source[2])
    if c.pos is None:
        lengths, other = positions[base].lengths, run.lengths[origin]
        bad = torch.nonzero(lengths != other).flatten()
        if len(bad):
            p = int(bad[0])
            raise ValueError(f"{label} reads every position of the {source[1]} run, but prompt {p} has "
                             f"{int(lengths[p])} tokens in the {base} run and its source has {int(other[p])}, so "
                             f"the positions do not correspond; {ALIGNMENT_HELP}")
        return ("column", cols)
    src = torch.stack([run.columns(p, label, source[1])[origin] for p in c.pos], dim=1)
    return ("column", src.flatten())


def _check_pattern_keys(positions: PromptPositions, i: Intervention, base: str) -> None:
    """A pattern row is over key positions: refuse reading it from prompts of another length (its keys
    would not correspond), and a key-position steering vector over prompts of different lengths."""
    source = value_source(i, base)
    lengths = positions[base].lengths
    if isinstance(i, Steer):
        same = bool((lengths == lengths[0]).all())
    elif source is None or source[0] == "zero":
        return
    elif source[0] == "run":
        same = torch.equal(positions[source[1]].lengths, lengths)
    else:  # a mean or a resample mixes prompts
        both = torch.cat([lengths, positions[source[1]].lengths])
        same = bool((both == both[0]).all())
    if not same:
        raise ValueError(f"{i.label}: an attention pattern is a row over key positions, so {i.kind} on it needs "
                         "prompts of one token length where it reads or mixes other prompts; patch the head "
                         "output (site 'head') instead, or use pairs of equal lengths")


class _SetPlan:
    """One source's elements at a site: the mask over the batch and, where the source's tokens sit
    elsewhere than the base run's, the column (or mean label) each element reads."""

    def __init__(self, shape: tuple, width: int) -> None:
        self.mask = torch.zeros(shape, dtype=torch.bool)
        self.width = width
        self.index: torch.Tensor | None = None
        self.labels: list[torch.Tensor] = []  # per-prompt source columns of each named mean label

    def add(self, index: tuple, read) -> None:
        self.mask[index] = True
        if read is None:
            return
        cols = index[2]
        if read[0] == "column":
            target = read[1]
        else:  # a mean per position label: a column if every prompt has it at one column, else its own label
            target = torch.empty_like(cols)
            k = len(read[1])
            for j, (_, columns) in enumerate(read[1]):
                at = slice(j, None, k)
                unique = columns.unique()
                if len(unique) == 1:
                    target[at] = unique[0]
                    continue
                known = [n for n, other in enumerate(self.labels) if torch.equal(other, columns)]
                if not known:
                    self.labels.append(columns)
                target[at] = self.width + (known[0] if known else len(self.labels) - 1)
        if self.index is None and bool((target == cols).all()):
            return
        if self.index is None:
            self.index = torch.arange(self.width).reshape((1, 1, -1) + (1,) * (self.mask.dim() - 3)) \
                .expand(self.mask.shape).clone()
        self.index[index] = target

    def kernel_source(self, source: tuple, n_prompts: int, positions: PromptPositions) -> tuple:
        """The source as the kernel reads it (`patchlab.kernels.patching.source_value`)."""
        index = None if self.index is None else self.index.flatten(0, 1)
        if source[0] == "zero":
            return source
        if source[0] == "mean":
            table = None
            if self.labels:  # rows 0..W-1: each column's real tokens; then one row per named label
                real = positions[source[1]].real()
                columns = torch.where(real.T, torch.arange(self.width)[:, None], torch.full((), -1))
                table = torch.cat([columns, torch.stack(self.labels)])
            return ("mean", source[1], table, index)
        perm = derangement(n_prompts, source[2]) if source[0] == "perm" else None
        return ("run", source[1], perm, index)


def _claim(claims: dict, index: tuple, shape: tuple, i: Intervention) -> None:
    """Record that `i` sets these elements; refuse an element set twice in one row."""
    if "owner" not in claims:
        claims["owner"], claims["who"] = torch.full(shape, -1, dtype=torch.long), []
    taken = claims["owner"][index]
    if bool((taken >= 0).any()):
        other = claims["who"][int(taken[taken >= 0][0])]
        c = i.component
        where = f"layer {c.layer}" + ("" if c.head is None else f" head {c.head}")
        raise ValueError(f"{other.label} and {i.label} both set {c.site.value} at {where} at the same "
                         "positions: a joint set may set each element once. Drop one, or give them "
                         "disjoint positions (Scale and Steer combine with a setting intervention instead)")
    claims["who"].append(i)
    claims["owner"][index] = len(claims["who"]) - 1


def _by_columns(prompt: torch.Tensor, cols: torch.Tensor) -> dict[tuple, list[int]]:
    """Prompts grouped by the columns they cover: ``{columns: [prompt, ...]}``."""
    per: dict[int, list[int]] = defaultdict(list)
    for p, col in zip(prompt.tolist(), cols.tolist()):
        per[p].append(col)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for p, columns in per.items():
        groups[tuple(columns)].append(p)
    return groups
