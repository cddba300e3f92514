"""Causal tracing of factual recall (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", ROME).

For each fact: the clean run; the corrupted run, in which Gaussian noise of scale
``noise`` x the standard deviation of subject-token embeddings (measured over the
dataset's subject tokens) is added to the subject tokens' input embeddings (the
residual stream entering block 0), one seeded draw per sample; then restoration
runs, each the corrupted run with one clean state copied back:

- ``hidden``: the residual stream leaving block ``layer`` (resid_post) at one position;
- ``mlp`` / ``attn``: the MLP / attention outputs at one position over a window of
  ``window`` consecutive layers centred on ``layer`` (clipped at the ends).

The metric is p(answer) (the probability of the answer's first token at the last
position), averaged over the noise samples; denoising throughout.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ._io import atomic_path
from .components import Component, Site
from .facts import Fact, FactDataset
from .kernels import patching as kpatching
from .metrics import Direction, Metric, Targets, get_metric
from .models import PatchModel, takes_model
from .provenance import provenance_attrs
from .remote import execute
from .runner import CachePass, patch_rows

__all__ = ["KINDS", "POSITIONS", "causal_trace", "window_layers", "subject_embedding_std"]

KINDS = {"hidden": Site.RESID_POST, "mlp": Site.MLP_OUT, "attn": Site.ATTN_OUT}
"""Restored state per kind."""

POSITIONS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
"""The token groups prompts are aligned on for the average (Meng et al. 2022, Fig. 1): the first,
middle (mean over the subject's inner tokens) and last subject token, the first token after the
subject, the further tokens (mean), and the last token."""


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The `window` layers centred on `layer` (``layer - window//2 .. layer - window//2 + window - 1``),
    clipped to ``0..n_layers-1`` (as in the ROME code)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window))


def subject_embedding_std(model: PatchModel, tokens, remote=None) -> float:
    """Standard deviation of the block-0 input over every subject token of the dataset
    (all units). One program: each prompt runs alone."""
    passes = [{"names": (i,), "ids": ids[None], "sites": [("resid_pre", 0)]} for i, ids in enumerate(tokens.ids)]
    acts = execute(model, kpatching.cache_runs, model.arch(), passes, remote=remote)
    values = [acts[(i, "resid_pre", 0)][0, span.start:span.stop].flatten()
              for i, span in enumerate(tokens.subject_positions)]
    return float(torch.cat(values).double().std())


@takes_model
def causal_trace(model: PatchModel, facts: FactDataset, *, kinds=("hidden", "mlp", "attn"), window: int = 10,
                 noise: float = 3.0, samples: int = 10, corruption: str = "noise",
                 metric: Metric | str = Metric.PROB, direction: Direction | str = Direction.DENOISING,
                 seed: int = 0, progress: bool = True, remote=None,
                 checkpoint: str | os.PathLike | None = None) -> xr.Dataset:
    """Causal traces of every fact (Meng et al. 2022, "Locating and Editing Factual
    Associations in GPT", arXiv 2202.05262).

    Args:
        corruption: "noise" (Gaussian noise on the subject embeddings, `noise` x their
            std, `samples` seeded draws) or "replace" (symmetric token replacement: the
            corrupted run reads each fact's ``counterfactual_subject`` in place of the
            subject, which must have as many tokens; one run, no sampling).
        metric: p(answer) ("prob", default), "logprob" (nats) or "kl" (to the clean
            output, nats) of the answer's first token at the last position.
        direction: "denoising" (default: the corrupted run with one clean state
            restored, as in the paper) or "noising" (the clean run with one state
            taken from the corrupted run).
        remote: see `patchlab.remote`; this costs 1 request for the embedding std plus
            1 per fact (both runs and every restoration of the fact in one program).
        checkpoint: a netCDF file of the facts traced so far, written after each fact; a
            rerun with the same file and settings traces only the rest.

    Returns:
        Dataset with ``prob`` (kind, prompt, layer, pos): p(answer) (or the chosen
        metric, named in attrs) with that state restored (NaN beyond a prompt's length), ``clean`` and ``corrupted`` (prompt)
        probabilities, ``subject`` (prompt, pos) 1 on subject tokens, ``token`` (prompt,
        pos) strings; attrs noise scale, embedding std, samples, window, seed, provenance.

    Raises:
        ValueError: an unknown kind or corruption, window < 1, samples < 1; for
            "replace", a fact without a counterfactual subject of the same token length;
            a checkpoint written with other settings or facts.
    """
    if corruption not in ("noise", "replace"):
        raise ValueError(f"corruption={corruption!r}: use 'noise' or 'replace'")
    metric, direction = get_metric(metric), Direction(direction)
    if metric is Metric.LOGIT_DIFF:
        raise ValueError("facts have no incorrect answer for a logit difference; use prob, logprob or kl")
    if bad := [k for k in kinds if k not in KINDS]:
        raise ValueError(f"unknown kinds {bad}; use some of {list(KINDS)}")
    if window < 1 or samples < 1:
        raise ValueError(f"window={window}, samples={samples}: both must be at least 1")
    tokens = facts.tokenize(model.tokenizer)
    n_layers, n_facts = model.layout.n_layers, len(facts)
    n_pos = max(len(ids) for ids in tokens.ids)
    std = subject_embedding_std(model, tokens, remote=remote)
    counterfactual = _counterfactual_ids(model, facts, tokens) if corruption == "replace" else [None] * len(facts)
    prob = np.full((len(kinds), n_facts, n_layers, n_pos), np.nan)
    clean_p, corrupted_p = np.zeros(n_facts), np.zeros(n_facts)
    subject = np.zeros((n_facts, n_pos), dtype=np.int8)
    token = np.full((n_facts, n_pos), "", dtype=object)
    settings = {"model_id": model.model_id, "facts_sha256": facts.sha256(), "kinds": ",".join(kinds),
                "window": window, "noise_scale": noise, "samples": samples, "corruption": corruption,
                "metric": metric.value, "direction": direction.value, "seed": seed}
    done = np.zeros(n_facts, dtype=bool)
    if checkpoint is not None and Path(checkpoint).exists():
        prob, clean_p, corrupted_p, done = _resume(checkpoint, settings, prob.shape)
    for i in tqdm(range(n_facts), desc="causal tracing", disable=not progress, leave=False):
        ids, span = tokens.ids[i][None], tokens.subject_positions[i]
        subject[i, span.start:span.stop] = 1
        token[i, :ids.shape[1]] = tokens.tokens[i]
        if done[i]:
            continue
        values, clean_p[i], corrupted_p[i] = trace_fact(model, ids, span, int(tokens.answer_ids[i]), kinds=kinds,
                                                        window=window, scale=noise * std, samples=samples, seed=seed + i,
                                                        metric=metric, direction=direction,
                                                        replacement=counterfactual[i], remote=remote)
        prob[:, i, :, :ids.shape[1]] = values
        done[i] = True
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                xr.Dataset({"prob": (("kind", "prompt", "layer", "pos"), prob), "clean": ("prompt", clean_p),
                            "corrupted": ("prompt", corrupted_p), "done": ("prompt", done.astype(np.int8))},
                           attrs=settings).to_netcdf(tmp)
    with warnings.catch_warnings():  # a group no prompt has (e.g. no inner subject tokens) averages to NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        average = np.nanmean(np.stack([_aligned(prob[:, i], tokens.subject_positions[i], len(tokens.ids[i]))
                                       for i in range(n_facts)]), axis=0)
    ds = xr.Dataset({
        "average": (("kind", "layer", "position"), average,
                    {"long_name": f"{metric.value} averaged over prompts aligned on token groups", "units": metric.units}),
        "prob": (("kind", "prompt", "layer", "pos"), prob,
                 {"long_name": f"{metric.value} with the state restored (denoising) or corrupted (noising)",
                  "units": metric.units}),
        "clean": ("prompt", clean_p, {"units": metric.units}),
        "corrupted": ("prompt", corrupted_p, {"units": metric.units}),
        "subject": (("prompt", "pos"), subject),
    }, coords={"kind": list(kinds), "prompt": np.arange(n_facts), "position": list(POSITIONS), "layer": np.arange(n_layers), "pos": np.arange(n_pos),
               "token": (("prompt", "pos"), token.astype(str)),
               "fact_prompt": ("prompt", np.asarray([f.prompt for f in facts], dtype=str)),
               "answer": ("prompt", np.asarray([f.answer for f in facts], dtype=str))})
    ds.attrs = provenance_attrs(model_id=model.model_id, model_sha256=model.weights_sha256,
                                dataset_sha256=facts.sha256(), seed=seed, metric=metric.value, units=metric.units,
                                direction=direction.value, corruption=corruption, noise_scale=noise,
                                embedding_std=std, samples=samples if corruption == "noise" else 1,
                                window=window, method="causal tracing (Meng et al. 2022)",
                                nan_values="positions beyond a prompt's length")
    return ds


def _resume(path, settings: dict, shape: tuple) -> tuple:
    with xr.open_dataset(path) as saved:
        if any(saved.attrs.get(k) != v for k, v in settings.items()) or saved["prob"].shape != shape:
            raise ValueError(f"checkpoint {path} holds a causal trace of other facts or settings; delete it or "
                             "pass another checkpoint path")
        return (saved["prob"].values.copy(), saved["clean"].values.copy(), saved["corrupted"].values.copy(),
                saved["done"].values.astype(bool))


def _aligned(prob: np.ndarray, span: range, n_pos: int) -> np.ndarray:
    """``[kind, layer, pos]`` -> ``[kind, layer, position]`` (NaN where a prompt lacks the group)."""
    nan = np.full(prob.shape[:2], np.nan)
    mean = lambda lo, hi: prob[..., lo:hi].mean(-1) if hi > lo else nan
    after = span.stop
    groups = [prob[..., span.start], mean(span.start + 1, span.stop - 1), prob[..., span.stop - 1],
              prob[..., after] if after < n_pos - 1 else nan, mean(after + 1, n_pos - 1), prob[..., n_pos - 1]]
    return np.stack(groups, axis=-1)


def _counterfactual_ids(model: PatchModel, facts: FactDataset, tokens) -> list[torch.Tensor]:
    out = []
    for fact, ids, span in zip(facts, tokens.ids, tokens.subject_positions):
        if not fact.counterfactual_subject:
            raise ValueError(f"fact {fact.prompt!r} has no counterfactual_subject; symmetric token replacement "
                             "needs one per fact (or use corruption='noise')")
        other = Fact(fact.prompt.replace(fact.subject, fact.counterfactual_subject, 1), fact.counterfactual_subject,
                     fact.answer)
        swapped = FactDataset(facts=(other,)).tokenize(model.tokenizer)
        if len(swapped.ids[0]) != len(ids) or swapped.subject_positions[0] != span:
            raise ValueError(f"counterfactual subject {fact.counterfactual_subject!r} does not take the token positions "
                             f"of {fact.subject!r} ({list(span)}) in {fact.prompt!r}; pick one with as many tokens")
        out.append(swapped.ids[0][None])
    return out


def trace_fact(model: PatchModel, ids: torch.Tensor, span: range, answer: int, *, kinds, window: int,
               scale: float, samples: int, seed: int, metric: Metric = Metric.PROB,
               direction: Direction = Direction.DENOISING,
               replacement: torch.Tensor | None = None, remote=None) -> tuple[np.ndarray, float, float]:
    """One fact: the metric per (kind, layer, pos) averaged over noise samples (or with the
    subject replaced by `replacement` ids), and the clean and corrupted metric.
    ``ids`` is ``[1, pos]``. One program (one request remotely): the clean run, the
    corrupted run (noise drawn here, seeded, and added to the clean embeddings in the
    program) and every restoration."""
    n_layers, n_pos = model.layout.n_layers, ids.shape[1]
    if replacement is None:
        generator = torch.Generator().manual_seed(seed)
        # float32 draws (the same noise whatever the model's dtype), scaled in float64; the program
        # adds them in the model's dtype
        eps = torch.randn(samples, len(span), model.layout.d_model, generator=generator).double() * scale
        clean_ids = ids.repeat(samples, 1)
        passes = [CachePass(("clean",), clean_ids),
                  CachePass(("corrupted",), clean_ids, noise={"from": "clean", "start": span.start, "eps": eps})]
    else:
        samples, clean_ids = 1, ids
        passes = [CachePass(("clean", "corrupted"), torch.cat([ids, replacement]))]
    targets = Targets(correct=torch.full((samples,), answer), incorrect=torch.full((samples,), answer))
    rows = [tuple(Component(site=KINDS[k], layer=layer, pos=p) for layer in
                  ([lay] if k == "hidden" else window_layers(lay, window, n_layers)))
            for k in kinds for lay in range(n_layers) for p in range(n_pos)]
    denoising = direction is Direction.DENOISING  # the corrupted run with one clean state restored
    result = patch_rows(model, passes=passes, base="corrupted" if denoising else "clean",
                        source="clean" if denoising else "corrupted",
                        base_ids=clean_ids if replacement is None or not denoising else replacement,
                        rows=rows, metric=metric, targets=targets, kl_from="clean",
                        base_embeds=denoising and replacement is None, progress=False, remote=remote)
    values = result.values.double().mean(1).numpy().reshape(len(kinds), n_layers, n_pos)
    return values, float(result.runs["clean"].mean()), float(result.runs["corrupted"].mean())
