"""Circuit discovery for IOI on SmolLM2: EAP, EAP-IG, exact edge scores, ACDC.

1. EAP and EAP-IG scores for every edge (noising: clean run, edges patched from the
   "abc" corrupted run; logit difference, nats);
2. exact scores of the top EAP-IG edges and of a random sample of the others, and the
   agreement report of each attribution method against them;
3. faithfulness curves (edge level, resample ablation) of the top-k edges of each method;
4. ACDC (logit difference, one-sided threshold) over the top 300 EAP-IG edges as
   candidates (every other edge starts removed: pruning all 70,651 edges one by one
   takes about 17 hours on a 2-core CPU);
5. the circuits (EAP-IG top-k and ACDC) evaluated under edge/node and resample/mean
   ablation, saved as netCDF and JSON, and drawn (PNG and SVG).

Writes ``results/ioi_circuit/<run-id>/`` like experiments/ioi.py; ``--resume RUN_ID``
keeps the steps already saved.

    python experiments/ioi_circuit.py [--n-prompts 8] [--acdc-candidates 300] [--circuit-size 50]
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys

import numpy as np
import xarray as xr

import patchlab as pl
from patchlab.circuit import Circuit, rank_edges
from patchlab.experiment import config_from_args


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str = pl.DEFAULT_MODEL
    n_prompts: int = 8
    order: str = "ABBA"
    corruption: str = "abc"
    metric: str = "logit_diff"
    ig_steps: int = 5
    exact_top: int = 200
    """Exact scores for this many top EAP-IG edges ..."""
    exact_random: int = 200
    """... and for this many other edges drawn at random."""
    acdc_candidates: int = 300
    """ACDC searches the top EAP-IG edges; the rest start removed."""
    acdc_metric: str = "logit_diff"
    """ACDC's metric: logit_diff (an edge goes if the logit difference falls by less than tau) or kl."""
    acdc_tau: float = 0.05
    """ACDC threshold in nats."""
    circuit_size: int = 50
    """Edges of the attribution circuit that is evaluated and drawn."""
    seed: int = 0
    results: str = "results"
    resume: str = ""
    remote: str = ""
    """Run on a hosted model: "ndif" (host and API key from NDIF_HOST / NDIF_API_KEY or nnsight's
    config), a host URL, or "local" (nnsight's in-process simulation); empty: run here."""


def main(config: Config) -> None:
    model = pl.load_model(config.model, remote=config.remote or False)
    dataset = pl.ioi_dataset(model.tokenizer, n_prompts=config.n_prompts, order=config.order,
                             corruption=config.corruption, seed=config.seed)
    metric, seed = config.metric, config.seed
    with pl.ExperimentRun("ioi_circuit", root=config.results, config=config, seed=seed,
                          run_id=config.resume or None, resume=bool(config.resume)) as run:
        run.save_prompts(dataset)
        run.record(model_id=model.model_id, model_sha256=model.weights_sha256, remote=config.remote)

        scores = {"EAP": run.step("scores_eap", lambda: pl.eap(model, dataset, metric=metric, seed=seed)),
                  "EAP-IG": run.step("scores_eap_ig", lambda: pl.eap_ig(model, dataset, steps=config.ig_steps,
                                                                     metric=metric, seed=seed))}
        ranked = rank_edges(scores["EAP-IG"])
        others = ranked[config.exact_top:]
        sample = ranked[:config.exact_top] + random.Random(seed).sample(others, min(config.exact_random, len(others)))
        exact = run.step("scores_exact_sample",
                         lambda: pl.exact_edge_scores(model, dataset, edges=sample, metric=metric, seed=seed))
        for name, ds in scores.items():
            report = pl.agreement(ds, exact)
            run.save_dataset(report, f"agreement_{_slug(name)}")
            run.record(**{f"agreement_{_slug(name)}": {"spearman": report.attrs["spearman"],
                                                       "top_k_overlap": dict(zip(report["k"].values.tolist(),
                                                                                 report["top_k_overlap"].values.tolist()))}})
        curves = {name: run.step(f"curve_{_slug(name)}",
                                 lambda ds=ds: pl.faithfulness_curve(model, dataset, ds, metric=metric))
                  for name, ds in {**scores, "exact (sampled edges)": exact}.items()}

        acdc_ds = run.load_dataset("circuit_acdc")
        if acdc_ds is None:
            acdc = pl.acdc(model, dataset, tau=config.acdc_tau, metric=config.acdc_metric,
                           candidates=ranked[:config.acdc_candidates], seed=seed,
                           checkpoint=run.path / "acdc_checkpoint.json")
            run.save_dataset(acdc.to_dataset(), "circuit_acdc")
        else:
            acdc = Circuit.from_dataset(acdc_ds)
        top = Circuit.top_k(scores["EAP-IG"], config.circuit_size)
        circuits = {"eap_ig_top": top, "acdc": acdc}
        run.save_dataset(top.to_dataset(), "circuit_eap_ig_top")
        for name, circuit in circuits.items():
            run.save_json(circuit.to_json(), f"circuit_{name}")
        evaluations = [run.step(f"faithfulness_{level}_{ablation}", lambda level=level, ablation=ablation:
                            pl.evaluate_circuits(model, dataset, list(circuits.values()), labels=list(circuits),
                                                 ablation=ablation, level=level, metric=metric))
                       for level in ("edge", "node") for ablation in ("resample", "mean")]
        run.record(faithfulness={f"{e.attrs['level']}/{e.attrs['ablation']}": dict(zip(
            e["circuit"].values.tolist(), np.round(e["faithfulness"].values, 4).tolist())) for e in evaluations},
            acdc_edges=sorted(e.label for e in acdc.edges), eap_ig_top_edges=[e.label for e in ranked[:20]])

        run.save_figure(pl.plot_faithfulness_curves(curves, title="IOI on SmolLM2: faithfulness of top-k edges"),
                        "faithfulness_curves", formats=("png", "svg"))
        run.save_figure(pl.plot_circuit(top, title=f"IOI, EAP-IG top {config.circuit_size} edges"),
                        "circuit_eap_ig_top", formats=("png", "svg"))
        run.save_figure(pl.plot_circuit(acdc, title=f"IOI, ACDC ({config.acdc_metric}, tau {config.acdc_tau})"),
                        "circuit_acdc", formats=("png", "svg"))
    _summary(scores, exact, curves, evaluations, acdc, run.path)


def _slug(name: str) -> str:
    return name.lower().replace("-", "_").split(" ")[0]


def _summary(scores: dict, exact: xr.Dataset, curves: dict, evaluations: list, acdc: Circuit, path) -> None:
    for name, ds in scores.items():
        print(f"{name:7s} top edges: " + ", ".join(f"{e.label} {float(ds['score'].sel(edge=e.label)):+.2f}"
                                              for e in rank_edges(ds)[:8]))
    for name, curve in curves.items():
        print(f"faithfulness {name:22s} " + " ".join(f"{int(k)}:{f:.2f}" for k, f in
                                                     zip(curve["n_edges"].values, curve["faithfulness"].values)))
    for e in evaluations:
        print(f"{e.attrs['level']:4s}/{e.attrs['ablation']:8s} " + ", ".join(
            f"{c} ({int(n)} edges) {f:.3f}" for c, n, f in zip(e["circuit"].values, e["n_edges"].values,
                                                            e["faithfulness"].values)))
    print(f"ACDC kept {len(acdc)} edges: {', '.join(e.label for e in sorted(acdc.edges)[:30])}")
    print(f"results in {path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    main(config_from_args(Config, description=__doc__.split("\n\n")[0]))
