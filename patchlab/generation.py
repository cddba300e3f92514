"""Text generation with interventions at every step: `generate`.

Refusal, and most behaviour a researcher studies, is judged on what the model says. `generate`
decodes replies with a joint set of node-level interventions (`patchlab.interventions`) applied in
the same engine as every sweep (`patchlab.runner`'s write plan, `patchlab.kernels.generation`):

- the prompt pass applies every intervention at the prompt positions it names (``pos=None``: every
  real prompt token), reading other runs as sweeps do;
- each generated token's pass applies the interventions at every position (``pos=None``) whose value
  comes from no run: zero ablation, `Scale`, `Steer`, `ProjectOut`, `At`. So
  ``ProjectOut(Component("resid_pre", layer), r)`` at every layer is Arditi et al.'s directional
  ablation and `Steer` at all positions their activation addition. An intervention that reads a
  run (`Patch`, mean or resampled `Ablate`, `Freeze`) has values at the prompt's positions only, so
  there it acts on the prompt.

Earlier positions come from the model's own KV cache (``cache=``), so a reply of ``n`` tokens costs
one prompt pass and ``n - 1`` one-token passes. The whole decode is one program: one request remotely.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from .components import Site
from .data import DatasetError, PromptPairDataset, left_padded, pad_token
from .interventions import At, Intervention, joint_set
from .kernels import generation as kgeneration
from .models import PatchModel, takes_model
from .patching import run_pair, tokenize_for
from .positions import PromptPositions, RunPositions
from .provenance import provenance_attrs
from .remote import execute, resolve_remote
from .runner import (CachePass, check_intervention, plan_writes, value_source, check_components, pass_specs,
                     run_masks)

__all__ = ["generate"]


@takes_model
def generate(model: PatchModel, prompts: PromptPairDataset | Sequence[str], interventions: Sequence[Intervention] = (),
             *, max_new_tokens: int = 32, run: str = "clean", temperature: float = 0.0, seed: int = 0,
             batch_size: int = 32, remote=None) -> xr.Dataset:
    """Replies to `prompts`, with `interventions` applied at every step (see the module docstring).

    Args:
        prompts: a `patchlab.PromptPairDataset` (decode from its `run` prompts; interventions may read
            the other run, and positions may be named), or prompt strings (one run, tokenized as given
            with the tokenizer's special tokens: apply a chat template first, e.g. `patchlab.chat_prompt`).
        interventions: one joint set of node-level interventions (not attention patterns).
        max_new_tokens: the longest reply, in tokens; a reply ends earlier at an end token (EOS, or
            the model's generation-config end tokens).
        run: ``"clean"`` or ``"corrupted"``, for a dataset.
        temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)`` with a
            generator seeded by `seed` (reproducible for one device and batch layout).
        batch_size: prompts decoded together (sorted by length, left-padded).
        remote: run on a hosted model (NDIF); the whole decode is one request.

    Returns:
        Dataset over ``prompt`` and ``step``: ``tokens`` (``[prompt, step]`` token ids, -1 after the
        reply ended), ``logprob`` (``[prompt, step]``, nats: each chosen token's log-probability
        under the intervened model), ``text`` (``[prompt]``, the decoded reply without special
        tokens), ``n_tokens`` (``[prompt]``); coord ``prompt_text``; attrs: provenance,
        ``interventions`` (JSON), ``max_new_tokens``, ``temperature``, ``seed``, ``run``.

    Raises:
        TypeError: `prompts` is neither a dataset nor a list of strings.
        ValueError: bad `max_new_tokens`, `temperature`, `batch_size` or `run`; an intervention on the
            attention pattern; an intervention that reads a run strings do not have (strings are one
            run: no `Patch` or mean ablation); any error of `patchlab.run_interventions`.
        patchlab.data.DatasetError: an empty prompt list or dataset problems.
    """
    interventions = joint_set(interventions) if interventions else ()
    _check_options(max_new_tokens, temperature, batch_size, run)
    base, base_ids, base_mask, positions, passes, texts, digest = _prompt_runs(model, prompts, run)
    n_prompts, width = base_ids.shape
    check_components(model, dict.fromkeys(i.component for i in interventions))
    run_names = {name for p in passes for name in p.names} | {base}
    for i in interventions:
        if i.component.site is Site.PATTERN:
            raise ValueError(f"{i.label}: generate takes no attention-pattern interventions (a pattern's key "
                             "positions grow with every token); intervene on the head outputs instead")
        check_intervention(model, i, run_names, base, n_prompts, width)
    if resolve_remote(remote, model.remote) is not None and any(isinstance(i, At) for i in interventions):
        raise ValueError("an At intervention runs a local Python function and cannot travel with remote=")
    reads = [i for i in interventions if value_source(i, base) not in (None, ("zero",))]  # values from a run
    every_step = tuple(i for i in interventions if i.component.pos is None and all(i is not j for j in reads))
    sites = {(i.component.site, i.component.layer) for i in reads}
    needed = {value_source(i, base)[1] for i in reads}
    masks = run_masks(passes) or {name: torch.ones(n_prompts, width, dtype=torch.bool) for name in run_names}
    spec = {"arch": model.arch(), "base": base, "base_ids": base_ids, "base_mask": base_mask, "masks": masks,
            "runs": pass_specs([p for p in passes if set(p.names) & needed], sites) if sites else [],
            "prefill": plan_writes(model, [interventions], n_prompts, positions, base) if interventions else [],
            "step": plan_writes(model, [every_step], n_prompts,
                                 PromptPositions.uniform(sorted(run_names), n_prompts, 1), base) if every_step else [],
            "groups": _groups(base_mask.sum(1), width, batch_size), "max_new_tokens": max_new_tokens,
            "stop_ids": _stop_ids(model), "temperature": float(temperature), "seed": int(seed)}
    out = execute(model, kgeneration.generate_program, spec, remote=remote)
    tokens, logprobs = out["tokens"].cpu(), out["logprobs"].cpu()
    n_tokens = (tokens >= 0).sum(1)
    replies = [model.tokenizer.decode([t for t in row if t >= 0], skip_special_tokens=True) for row in tokens.tolist()]
    return xr.Dataset(
        {"tokens": (("prompt", "step"), tokens.numpy(), {"long_name": "generated token id (-1: after the end)"}),
         "logprob": (("prompt", "step"), logprobs.double().numpy(),
                     {"long_name": "log-probability of the chosen token", "units": "nats"}),
         "text": (("prompt",), np.asarray(replies, dtype=str), {"long_name": "reply, special tokens removed"}),
         "n_tokens": (("prompt",), n_tokens.numpy(), {"long_name": "reply length", "units": "tokens"})},
        coords={"prompt": np.arange(n_prompts), "step": np.arange(max_new_tokens),
                "prompt_text": ("prompt", np.asarray(texts, dtype=str))},
        attrs=provenance_attrs(model_id=model.model_id, model_sha256=model.weights_sha256, dataset_sha256=digest,
                               seed=seed, interventions=json.dumps([i.to_json() for i in interventions]),
                               max_new_tokens=max_new_tokens, temperature=float(temperature), run=base,
                               decoding="greedy" if temperature == 0 else "sampled"))


def _check_options(max_new_tokens, temperature, batch_size, run) -> None:
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if run not in ("clean", "corrupted"):
        raise ValueError(f"run must be 'clean' or 'corrupted' (the dataset's prompts to decode from), got {run!r}")


def _prompt_runs(model: PatchModel, prompts, run: str):
    """The base run (name, ids, mask), positions, cache passes, prompt texts and a digest of the prompts."""
    if isinstance(prompts, PromptPairDataset):
        tokens = tokenize_for(model, prompts)
        ids, mask = (tokens.clean_ids, tokens.clean_mask) if run == "clean" else \
            (tokens.corrupted_ids, tokens.corrupted_mask)
        texts = [p.clean if run == "clean" else p.corrupted for p in prompts.pairs]
        pass_ = run_pair(tokens)
        if pass_.mask is None:
            pass_ = CachePass(names=pass_.names, ids=pass_.ids, mask=torch.ones_like(pass_.ids, dtype=torch.bool))
        return run, ids, mask, tokens.run_positions(), [pass_], texts, prompts.sha256()
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("generate(prompts) takes a PromptPairDataset or a list of prompt strings, got "
                        f"{type(prompts).__name__}")
    if not prompts:
        raise DatasetError("generate needs at least one prompt")
    seqs = [list(model.tokenizer(p)["input_ids"]) for p in prompts]
    if any(not s for s in seqs):
        raise DatasetError(f"prompt {next(i for i, s in enumerate(seqs) if not s)} has no tokens")
    width = max(len(s) for s in seqs)
    ids, mask = left_padded(seqs, width, pad_token(model.tokenizer)[0])
    positions = PromptPositions(runs={"clean": RunPositions(lengths=mask.sum(1), width=width, names={})})
    digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    return "clean", ids, mask, positions, [CachePass(names=("clean",), ids=ids, mask=mask)], list(prompts), digest


def _groups(lengths: torch.Tensor, width: int, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """Prompts sorted by length in groups of `batch_size`: ``[(prompt indices, first column)]``."""
    order = sorted(range(len(lengths)), key=lambda p: (-int(lengths[p]), p))
    groups = []
    for start in range(0, len(order), batch_size):
        members = sorted(order[start:start + batch_size])
        groups.append((torch.tensor(members, dtype=torch.long), width - max(int(lengths[p]) for p in members)))
    return groups


def _stop_ids(model: PatchModel) -> torch.Tensor:
    """Tokens that end a reply: the tokenizer's EOS and the generation config's end tokens."""
    ids = {model.tokenizer.eos_token_id}
    config = getattr(model.hf, "generation_config", None)
    end = getattr(config, "eos_token_id", None)
    ids.update(end if isinstance(end, (list, tuple)) else [end])
    return torch.tensor(sorted(int(i) for i in ids if i is not None), dtype=torch.long)
