"""Path patching of IOI on SmolLM2 (Wang et al. 2022, arXiv 2211.00593).

1. every head -> logits (direct effects), with the paper's "abc" corruption;
2. every head -> the q, k and v of the heads with the largest direct effect;
3. figures: sender heatmaps (per channel) and a graph of the strongest paths.

Writes ``results/ioi_paths/<run-id>/`` like experiments/ioi.py.

    python experiments/ioi_paths.py [--receivers 3] [--n-prompts 8]
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np

import patchlab as pl
from patchlab.experiment import config_from_args
from patchlab.graph import Node, NodeKind
from patchlab.graph_plots import plot_channels, plot_path_graph
from patchlab.paths import path_patch_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str = pl.DEFAULT_MODEL
    n_prompts: int = 8
    order: str = "ABBA"
    corruption: str = "abc"
    metric: str = "logit_diff"
    receivers: int = 3
    """How many heads with the largest positive direct effect receive the q/k/v sweep."""
    freeze_mlps: int = 0
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
    common = dict(metric=config.metric, freeze_mlps=bool(config.freeze_mlps), seed=config.seed)
    with pl.ExperimentRun("ioi_paths", root=config.results, config=config, seed=config.seed,
                          run_id=config.resume or None, resume=bool(config.resume)) as run:
        run.save_prompts(dataset)
        run.record(model_id=model.model_id, model_sha256=model.weights_sha256, remote=config.remote)
        to_logits = run.load_dataset("heads_to_logits")
        if to_logits is None:
            to_logits = path_patch_heads(model, dataset, receivers="logits", **common)
            run.save_dataset(to_logits, "heads_to_logits")
            run.save_figure(pl.plot_sweep(to_logits), "heads_to_logits")
        stacked = to_logits.score.stack(node=("layer", "head"))
        top = [Node(NodeKind.HEAD, int(layer), int(head))
               for layer, head in stacked["node"].values[np.argsort(-stacked.values)[:config.receivers]]]
        run.record(receivers=[n.label for n in top],
                   direct_effects={n.label: float(to_logits.score.sel(layer=n.layer, head=n.head)) for n in top})
        to_receivers = run.load_dataset("heads_to_receivers")
        if to_receivers is None:
            to_receivers = path_patch_heads(model, dataset, receivers=top, **common)
            run.save_dataset(to_receivers, "heads_to_receivers")
            run.save_figure(plot_channels(to_receivers), "heads_to_receivers")
        run.save_figure(plot_path_graph(to_logits, to_receivers), "path_graph")
    print(f"receivers {[n.label for n in top]}; results in {run.path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    main(config_from_args(Config, description=__doc__.split("\n\n")[0]))
