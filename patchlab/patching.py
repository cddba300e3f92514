"""Activation patching sweeps (node level), returning labelled ``xarray.Dataset`` results.

Each sweep runs the clean and corrupted prompts once to cache activations, then
patches one component per row, many rows per forward pass (see `patchlab.runner`).

- **denoising**: clean activation patched into the corrupted run (sufficiency);
- **noising**: corrupted activation patched into the clean run (necessity);

Heimersheim & Nanda 2024, "How to use and interpret activation patching"
(arXiv 2404.15255); Zhang & Nanda 2023 (arXiv 2309.16042). Results share the
dims ``layer``, ``head``, ``pos``, ``prompt`` and ``component`` and carry:

- ``patched`` (..., prompt): the metric on each patched run, in the metric's units;
- ``score`` (...): the normalised score on prompt means (formula in attrs);
- ``clean`` (prompt), ``corrupted`` (prompt): the baselines;
- attrs: metric, units, direction, site, corruption, dataset, score formula and
  provenance (model id and weight hash, dataset hash, seed, versions, git commit, time).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from .components import Component, Site, as_index
from .data import DatasetError, PromptPairDataset, TokenizedPairs
from .metrics import Direction, Metric, Targets, get_metric, normalised_score, score_formula
from .models import PatchModel, takes_model
from .provenance import provenance_attrs
from .interventions import Patch
from .runner import CachePass, check_range, run_rows

__all__ = ["patch_components", "patch_layer_pos", "patch_heads"]

_RESID_SITES = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT)


@takes_model
def patch_layer_pos(model: PatchModel, dataset: PromptPairDataset, *, site: Site | str = Site.RESID_PRE,
                    layers: Iterable[int] | None = None, positions: Iterable[int | str] | None = None,
                    metric: Metric | str = Metric.LOGIT_DIFF, direction: Direction | str = Direction.DENOISING,
                    seed: int | None = None, progress: bool = True, memory_mb: float = 1024,
                    remote=None) -> xr.Dataset:
    """Patch a d_model-wide site (residual stream, attention or MLP output) at each layer and position.

    Args:
        site: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out`` or ``mlp_out``.
        layers: the layers to sweep (default: all).
        positions: token indices, offsets from the end (``-1``) or the dataset's names ("S2").
            Prompts of one length: default every position, names become indices. Prompts of
            different lengths (left-padded): each position resolves per prompt
            (`patchlab.positions`); default the offsets ``-n..-1`` that every prompt reaches.
        metric: a `Metric` or its name; values are in its units (nats, probability).
        direction: ``denoising`` or ``noising``.
        seed: recorded in attrs (the seed that generated `dataset`).
        remote: run on a hosted model (NDIF): True, a host URL, "local" or a
            `patchlab.Remote`; None: the model's default. The whole sweep is one
            request (see `patchlab.remote`).

    Returns:
        Dataset with ``patched`` (layer, pos, prompt), ``score`` (layer, pos),
        ``clean`` (prompt), ``corrupted`` (prompt); coords ``token`` and
        ``pos_name`` along ``pos`` (prompt 0's clean token and name). When positions resolve per
        prompt, ``pos`` holds them as given and ``pos_index`` (pos, prompt) each prompt's own
        token index in the patched run; attrs ``padding`` ("left"/"none") and the pad token.

    Raises:
        ValueError: a per-head site, ``resid_mid`` on a parallel-residual model, a layer or
            position out of range, a name the dataset lacks, or an offset beyond a prompt.
        patchlab.data.DatasetError: the dataset does not tokenize consistently.
    """
    site = Site(site)
    if site not in _RESID_SITES:
        raise ValueError(f"patch_layer_pos takes one of {[s.value for s in _RESID_SITES]}; "
                         f"for {site.value!r} use patch_heads")
    tokens = tokenize_for(model, dataset)
    layers, positions = _layers(model, layers), _positions(tokens, positions)
    grid = [(Component(site=site, layer=layer, pos=p),) for layer in layers for p in positions]
    values, base = _run(model, tokens, grid, metric, direction, progress, memory_mb, remote)
    patched = values.reshape(len(layers), len(positions), -1)
    return result_dataset(model, dataset, tokens, base, patched, ("layer", "pos"),
                    {"layer": layers, "pos": positions}, site.value, seed)


@takes_model
def patch_heads(model: PatchModel, dataset: PromptPairDataset, *, site: Site | str = Site.HEAD,
                per_position: bool = False, layers: Iterable[int] | None = None,
                positions: Iterable[int | str] | None = None,
                metric: Metric | str = Metric.LOGIT_DIFF, direction: Direction | str = Direction.DENOISING,
                seed: int | None = None, progress: bool = True, memory_mb: float = 1024,
                    remote=None) -> xr.Dataset:
    """Patch every attention head's output, its q, k or v input, or its attention pattern, at each layer.

    For ``k`` and ``v`` on grouped-query models the ``head`` dim indexes key/value
    heads (``n_kv_heads`` of them); patching one changes every query head of its
    group. The attr ``head_kind`` says which.

    Args:
        site: ``head`` (output before the output projection), ``q``, ``k``, ``v`` or ``pattern``
            (the head's attention probabilities; needs eager attention, and `per_position`
            then patches one query position's row).
        per_position: patch each position separately (adds a ``pos`` dim) instead
            of all positions at once.
        positions: with `per_position`, the positions to sweep (as in `patch_layer_pos`).
        (other args as in `patch_layer_pos`)

    Returns:
        Dataset with ``patched`` (layer, head[, pos], prompt), ``score`` (layer, head[, pos]),
        ``clean`` (prompt), ``corrupted`` (prompt); with `per_position`, the ``pos`` coords of
        `patch_layer_pos`.

    Raises:
        ValueError: an all-position patch (``per_position=False``) between a clean and a corrupted
            prompt of different lengths: their positions do not correspond; sweep positions by
            name or from the end instead (`patchlab.positions`).
    """
    site = Site(site)
    if not site.per_head:
        raise ValueError(f"patch_heads takes 'head', 'q', 'k', 'v' or 'pattern', got {site.value!r}; "
                         "use patch_layer_pos")
    tokens = tokenize_for(model, dataset)
    layers = _layers(model, layers)
    heads = list(range(model.layout.n_heads_at(site)))
    if positions is not None and not per_position:
        raise ValueError("positions= selects the positions of a per-position sweep; pass per_position=True too")
    positions = _positions(tokens, positions) if per_position else [None]
    grid = [(Component(site=site, layer=layer, head=h, pos=p),)
            for layer, h, p in itertools.product(layers, heads, positions)]
    values, base = _run(model, tokens, grid, metric, direction, progress, memory_mb, remote)
    dims, coords = ("layer", "head"), {"layer": layers, "head": heads}
    if per_position:
        dims, coords = dims + ("pos",), {**coords, "pos": positions}
    patched = values.reshape(*[len(coords[d]) for d in dims], -1)
    head_kind = "key/value head" if site in (Site.K, Site.V) and model.layout.n_kv_heads != model.layout.n_heads \
        else "query head"
    return result_dataset(model, dataset, tokens, base, patched, dims, coords, site.value, seed,
                    head_kind=head_kind, positions="each" if per_position else "all")


@takes_model
def patch_components(model: PatchModel, dataset: PromptPairDataset, components: Sequence, *,
                     metric: Metric | str = Metric.LOGIT_DIFF, direction: Direction | str = Direction.DENOISING,
                     seed: int | None = None, progress: bool = True, memory_mb: float = 1024,
                    remote=None) -> xr.Dataset:
    """Patch each item of a list, one row each: a `Component`, or a joint set of them (a list or
    tuple of components patched together in one run).

    Args:
        components: a list or tuple whose items are `Component` values or lists/tuples of them.
            Positions may be indices, offsets from the end (``-1``) or the dataset's names ("S2").

    Returns:
        Dataset with ``patched`` (component, prompt), ``score`` (component),
        ``clean`` (prompt), ``corrupted`` (prompt); ``component`` coords are labels
        such as "L9H6" (joint sets: "L9H6+L10H0") with ``layer`` (the earliest) and ``site``
        as extra coords.
    """
    rows = _component_rows(components)
    tokens = tokenize_for(model, dataset)
    values, base = _run(model, tokens, rows, metric, direction, progress, memory_mb, remote)
    ds = result_dataset(model, dataset, tokens, base, values, ("component",),
                  {"component": ["+".join(c.label for c in row) for row in rows]}, "mixed", seed)
    return ds.assign_coords(layer=("component", [min(c.layer for c in row) for row in rows]),
                            site=("component", ["+".join(dict.fromkeys(c.site.value for c in row)) for row in rows]))


# ---- shared machinery -------------------------------------------------------------

def tokenize_for(model: PatchModel, dataset: PromptPairDataset, *, paired: str | None = None) -> TokenizedPairs:
    """Tokenize and validate `dataset` for `model` (its tokenizer and context length).

    Args:
        paired: the name of an algorithm that patches every position of a sender, so each clean
            prompt needs as many tokens as its corrupted one (`require_paired_lengths`).

    Raises:
        patchlab.data.DatasetError: see `PromptPairDataset.tokenize` and `require_paired_lengths`.
    """
    if not isinstance(dataset, PromptPairDataset):
        raise TypeError(f"expected a PromptPairDataset, got {type(dataset).__name__}")
    tokens = dataset.tokenize(model.tokenizer, max_length=model.layout.n_ctx)
    if paired is not None:
        require_paired_lengths(tokens, paired)
    return tokens


def require_paired_lengths(tokens: TokenizedPairs, algorithm: str) -> None:
    """Refuse a pair whose clean and corrupted prompts differ in length, for an algorithm that
    patches every position of a sender (pairs of different lengths from each other are fine).

    Raises:
        patchlab.data.DatasetError: the message names the pair, its lengths and the fixes.
    """
    clean, corrupted = tokens.clean_mask.sum(1), tokens.corrupted_mask.sum(1)
    bad = torch.nonzero(clean != corrupted).flatten()
    if len(bad):
        p = int(bad[0])
        raise DatasetError(
            f"{algorithm} patches every position of a sender, so each clean prompt needs as many tokens as its "
            f"corrupted prompt; pair {p} has {int(clean[p])} and {int(corrupted[p])} tokens. Fix: pair prompts of "
            "equal token lengths (pl.chat_pairs(..., match_lengths=True)), or use node-level work "
            "(patch_layer_pos, patch_heads(per_position=True), pl.sweep_interventions), which aligns positions by "
            "name or from the end")


def length_groups(tokens: TokenizedPairs) -> list[tuple[torch.Tensor, int]] | None:
    """The prompts grouped by token length, ``[(prompt indices, length)]`` shortest first, for a
    program that runs each length unpadded; None when every prompt has one length. Needs each clean
    prompt of its corrupted prompt's length (`require_paired_lengths`)."""
    if not tokens.padded:
        return None
    lengths = tokens.clean_mask.sum(1)
    return [(torch.nonzero(lengths == n).flatten(), int(n)) for n in lengths.unique().tolist()]


def _component_rows(components) -> list[tuple[Component, ...]]:
    """`components` as rows: a Component is a row of one, a list or tuple of them a joint row."""
    if isinstance(components, Component):
        raise TypeError(f"components must be a list of Components, got the single {components!r}: "
                        f"pass [{components!r}]")
    if isinstance(components, (set, frozenset, Mapping)) or not isinstance(components, Iterable):
        raise TypeError(f"components must be a list or tuple of Components (one row each, in the order "
                        f"given), got a {type(components).__name__}; for a set, pass sorted(components)")
    rows = []
    for i, item in enumerate(components):
        row = (item,) if isinstance(item, Component) else tuple(item) if isinstance(item, (list, tuple)) else None
        if not row or not all(isinstance(c, Component) for c in row):
            raise TypeError(
                f"components[{i}] is {item!r}: each item must be a Component (patched on its own) or a non-empty "
                "list or tuple of Components (patched jointly, one row); for other interventions use "
                "pl.sweep_interventions")
        rows.append(row)
    if not rows:
        raise ValueError("components is empty; give at least one Component")
    return rows


def _layers(model: PatchModel, layers) -> list[int]:
    return check_range("layer", _listed(layers), model.layout.n_layers)


def _positions(tokens: TokenizedPairs, positions) -> list[int | str]:
    """The positions of a per-position sweep. With prompts of one length and names at one index,
    token indices (names become their index; default: every position). Otherwise positions resolve
    per prompt (`patchlab.positions`): offsets from the end and names as given, indices from each
    prompt's start; default: the offsets ``-n..-1`` that every prompt reaches."""
    values = _listed(positions)
    shared = None if tokens.padded else tokens.run_positions().shared()
    if shared is not None:
        if values is not None:
            unknown = [v for v in values if isinstance(v, str) and v not in shared]
            if unknown:
                raise ValueError(f"positions {unknown} are not named positions of this dataset; its names are "
                                 f"{shared} (or give token indices 0..{tokens.n_pos - 1})")
            values = [shared[v] if isinstance(v, str) else v for v in values]
        return check_range("pos", values, tokens.n_pos)
    if values is None:
        shortest = int(min(tokens.clean_mask.sum(1).min(), tokens.corrupted_mask.sum(1).min()))
        return list(range(-shortest, 0))
    out = list(dict.fromkeys(v if isinstance(v, str) else as_index(v, "pos") for v in values))
    if not out:
        raise ValueError("positions is empty; give at least one position (None: every offset all prompts reach)")
    return out


def pos_coords(tokens: TokenizedPairs, positions: Sequence, base: str) -> dict:
    """The coords along ``pos`` of a per-position sweep: ``pos`` itself (token indices, or the offsets
    and names as given when positions resolve per prompt, as strings if mixed), ``token`` and
    ``pos_name`` (of prompt 0's clean run), and, when positions resolve per prompt, ``pos_index``
    (``[pos, prompt]``: each prompt's own token index in the `base` run)."""
    run_positions = tokens.run_positions()
    clean, base_run = run_positions["clean"], run_positions[base]

    def own(run, p):  # each prompt's own token index of position p
        return run.columns(p, "pos", base) - (run.width - run.lengths)

    first = [int(own(clean, p)[0]) for p in positions]
    named = {index: name for name, index in tokens.clean_positions[0].items()}
    coords = {"token": ("pos", np.asarray([tokens.clean_tokens[0][i] for i in first], dtype=str)),
              "pos_name": ("pos", np.asarray([p if isinstance(p, str) else named.get(i, "")
                                              for p, i in zip(positions, first)], dtype=str))}
    if all(isinstance(p, int) and p >= 0 for p in positions) and not tokens.padded \
            and run_positions.shared() is not None:
        return {"pos": np.asarray(positions), **coords}
    values = np.asarray(positions) if all(isinstance(p, int) for p in positions) else \
        np.asarray([str(p) for p in positions], dtype=str)
    index = np.stack([own(base_run, p).numpy() for p in positions])
    return {"pos": values, **coords, "pos_index": (("pos", "prompt"), index)}


def _listed(values) -> list | None:
    """None, or the values as a list (a single int or name stands for a list of one)."""
    if values is None:
        return None
    if isinstance(values, (str, int, np.integer)) or getattr(values, "ndim", None) == 0:
        return [values]
    return list(values)


def _run(model: PatchModel, tokens: TokenizedPairs, rows: list[tuple[Component, ...]], metric, direction,
         progress: bool, memory_mb: float, remote=None):
    """Activation patching as intervention rows: each row's components take the source run's values
    (`patchlab.interventions.Patch`), on the one engine (`patchlab.runner.run_rows`)."""
    metric, direction = get_metric(metric), Direction(direction)
    base, source = ("corrupted", "clean") if direction is Direction.DENOISING else ("clean", "corrupted")
    result = run_rows(model, passes=[run_pair(tokens)], base=base,
                      base_ids=tokens.corrupted_ids if base == "corrupted" else tokens.clean_ids,
                      rows=[tuple(Patch(c, source=source) for c in row) for row in rows], metric=metric,
                      targets=pair_targets(tokens), positions=tokens.run_positions(), memory_mb=memory_mb,
                      progress=progress,
                      remote=remote, gap=("clean", "corrupted"))
    return result.values, {"metric": metric, "direction": direction, **result.runs}


def run_pair(tokens: TokenizedPairs) -> CachePass:
    """The cache pass of the clean and corrupted runs (one forward pass), with their attention
    masks when the prompts are left-padded."""
    mask = torch.cat([tokens.clean_mask, tokens.corrupted_mask]) if tokens.padded else None
    return CachePass(names=("clean", "corrupted"), ids=torch.cat([tokens.clean_ids, tokens.corrupted_ids]), mask=mask)


def pair_targets(tokens: TokenizedPairs) -> Targets:
    return Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)


def result_dataset(model: PatchModel, dataset: PromptPairDataset, tokens: TokenizedPairs, base: dict,
             patched: torch.Tensor, dims: tuple[str, ...], coords: dict, site: str, seed: int | None,
             **extra_attrs) -> xr.Dataset:
    """The result Dataset shared by every sweep: ``patched``, ``score``, baselines, coords, provenance attrs."""
    metric, direction = base["metric"], base["direction"]
    clean, corrupted = base["clean"].double().numpy(), base["corrupted"].double().numpy()
    patched = patched.double().numpy()
    prompts = np.arange(tokens.n_prompts)
    score = normalised_score(patched.mean(-1), clean.mean(), corrupted.mean(), direction)
    ds = xr.Dataset(
        {
            "patched": (dims + ("prompt",), patched, {"long_name": f"patched {metric.value}", "units": metric.units}),
            "score": (dims, score, {"long_name": "normalised patching score", "units": "1"}),
            "clean": (("prompt",), clean, {"long_name": f"clean {metric.value}", "units": metric.units}),
            "corrupted": (("prompt",), corrupted, {"long_name": f"corrupted {metric.value}", "units": metric.units}),
        },
        coords={**{d: np.asarray(v) if d != "component" else np.asarray(v, dtype=str) for d, v in coords.items()
                   if d != "pos"},
                "prompt": prompts,
                "clean_prompt": ("prompt", np.asarray([p.clean for p in dataset.pairs], dtype=str))},
    )
    if "pos" in coords:
        ds = ds.assign_coords(pos_coords(tokens, coords["pos"], "corrupted" if direction is Direction.DENOISING
                                         else "clean"))
    ds.attrs = provenance_attrs(
        model_id=model.model_id, model_sha256=model.weights_sha256, dataset_sha256=dataset.sha256(),
        seed=seed, git_path=Path(__file__).parent,
        metric=metric.value, units=metric.units, metric_formula=metric.formula, direction=direction.value, site=site,
        dataset=dataset.name, corruption=dataset.corruption, score_formula=score_formula(direction),
        model_family=model.adapter.family, **tokens.pad_attrs(), **extra_attrs)
    return ds
