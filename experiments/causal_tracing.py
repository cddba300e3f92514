"""Causal tracing of factual recall on SmolLM2 (Meng et al. 2022, ROME).

1. the built-in facts, checked against the model (kept: answer top-1, p >= min_prob);
2. causal traces of the first ``n_facts`` kept facts: subject embeddings noised
   (3 x their standard deviation, 10 seeded samples), hidden states restored per
   (token, layer), MLP and attention outputs over windows of 10 layers;
3. figures: per-fact traces and the average over facts aligned on token groups.

Writes ``results/causal_tracing/<run-id>/``; ``--resume RUN_ID`` keeps saved steps.

    python experiments/causal_tracing.py [--n-facts 10] [--samples 10]
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np
import xarray as xr

import patchlab as pl
from patchlab.experiment import config_from_args
from patchlab.facts import FactDataset, builtin_facts, check_facts
from patchlab.tracing import causal_trace
from patchlab.tracing_plots import plot_causal_trace, plot_causal_trace_summary


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str = pl.DEFAULT_MODEL
    n_facts: int = 10
    """How many of the facts the model gets right are traced."""
    min_prob: float = 0.1
    samples: int = 10
    noise: float = 3.0
    """Noise scale, in standard deviations of the subject-token embeddings."""
    window: int = 10
    figures: int = 3
    """Per-fact figures for the first facts."""
    seed: int = 0
    results: str = "results"
    resume: str = ""
    remote: str = ""
    """Run on a hosted model: "ndif" (host and API key from NDIF_HOST / NDIF_API_KEY or nnsight's
    config), a host URL, or "local" (nnsight's in-process simulation); empty: run here."""


def main(config: Config) -> None:
    model = pl.load_model(config.model, remote=config.remote or False)
    with pl.ExperimentRun("causal_tracing", root=config.results, config=config, seed=config.seed,
                          run_id=config.resume or None, resume=bool(config.resume)) as run:
        known, checked = check_facts(model, builtin_facts(), min_prob=config.min_prob)  # one request remotely
        run.save_dataset(checked, "facts_checked")
        facts = FactDataset(facts=known.facts[:config.n_facts], name=known.name)
        run.save_prompts(facts, "facts")
        trace = run.load_dataset("causal_trace")
        if trace is None:
            trace = causal_trace(model, facts, window=config.window, noise=config.noise, samples=config.samples,
                                 seed=config.seed, checkpoint=run.path / "causal_trace.partial.nc")
            run.save_dataset(trace, "causal_trace")
            (run.path / "causal_trace.partial.nc").unlink()
        for i in range(min(config.figures, len(facts))):
            run.save_figure(plot_causal_trace(trace, prompt=i), f"trace_{i}", formats=("png", "svg"))
        average = xr.Dataset({"prob": trace["average"], "clean": trace["clean"].mean(),
                              "corrupted": trace["corrupted"].mean()}, attrs=trace.attrs)
        run.save_figure(plot_causal_trace_summary(average), "trace_average", formats=("png", "svg"))
        peaks = summary(trace)
        run.record(n_known=len(known), n_checked=int(checked.sizes["fact"]), peaks=peaks,
                   clean_mean=float(trace["clean"].mean()), corrupted_mean=float(trace["corrupted"].mean()))
    print(f"{len(known)} of {checked.sizes['fact']} facts known; traced {len(facts)}; "
          f"mean p(answer) clean {float(trace['clean'].mean()):.3f}, corrupted {float(trace['corrupted'].mean()):.3f}")
    for name, peak in peaks.items():
        print(f"{name:20s}: peak p(answer) {peak['p']:.3f} at layer {peak['layer']}")
    print(f"results in {run.path}")


def summary(trace) -> dict:
    """Where each kind's average effect peaks at the last subject token and the last token."""
    out = {}
    for kind in trace["kind"].values:
        for position in ("last_subject", "last"):
            curve = trace["average"].sel(kind=kind, position=position).values
            layer = int(np.nanargmax(curve))
            out[f"{kind}@{position}"] = {"layer": layer, "p": float(curve[layer])}
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    main(config_from_args(Config, description=__doc__.split("\n\n")[0]))
