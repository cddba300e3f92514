"""Activation patching of indirect-object identification (IOI), end to end.

Wang et al. 2022, "Interpretability in the Wild" (arXiv 2211.00593). Loads the
model (default: the embedded SmolLM2-135M-Instruct, offline), builds a seeded IOI
dataset with the name-swap corruption, runs denoising sweeps (clean activations
into the corrupted run) over the residual stream, attention and MLP outputs per
layer and position, and over every head's output, and writes
``results/ioi/<run-id>/`` with netCDF results, PNG figures, the prompts, the
config, a manifest and a log.

    python experiments/ioi.py                   # defaults below
    python experiments/ioi.py --model gpt2 --n-prompts 16
    python experiments/ioi.py --remote ndif --model meta-llama/Llama-3.1-8B   # on NDIF: 4 requests
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import patchlab as pl
from patchlab.experiment import config_from_args


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str = pl.DEFAULT_MODEL
    """Embedded short name, Hugging Face Hub id, or local folder."""
    n_prompts: int = 8
    """IOI prompts in the dataset."""
    order: str = "ABBA"
    """Name order of the first clause: ABBA or BABA."""
    corruption: str = "name_swap"
    """name_swap (symmetric token replacement) or abc (three unrelated names)."""
    metric: str = "logit_diff"
    """logit_diff, logprob, prob or kl."""
    direction: str = "denoising"
    """denoising (clean into corrupted) or noising (corrupted into clean)."""
    seed: int = 0
    """Seed of the dataset generator."""
    results: str = "results"
    """Folder that receives results/ioi/<run-id>/."""
    resume: str = ""
    remote: str = ""
    """Run on a hosted model: "ndif" (host and API key from NDIF_HOST / NDIF_API_KEY or nnsight's
    config), a host URL, or "local" (nnsight's in-process simulation); empty: run here."""
    """Run id of an interrupted run to finish: sweeps it already saved are kept."""


def main(config: Config) -> None:
    model = pl.load_model(config.model, remote=config.remote or False)
    dataset = pl.ioi_dataset(model.tokenizer, n_prompts=config.n_prompts, order=config.order,
                             corruption=config.corruption, seed=config.seed)
    common = dict(metric=config.metric, direction=config.direction, seed=config.seed)
    sweeps = {
        "resid_pre": lambda: pl.patch_layer_pos(model, dataset, site="resid_pre", **common),
        "attn_out": lambda: pl.patch_layer_pos(model, dataset, site="attn_out", **common),
        "mlp_out": lambda: pl.patch_layer_pos(model, dataset, site="mlp_out", **common),
        "heads": lambda: pl.patch_heads(model, dataset, site="head", **common),
    }
    with pl.ExperimentRun("ioi", root=config.results, config=config, seed=config.seed,
                          run_id=config.resume or None, resume=bool(config.resume)) as run:
        run.save_prompts(dataset)
        run.record(model_id=model.model_id, model_sha256=model.weights_sha256, remote=config.remote,
                   dataset_sha256=dataset.sha256())
        results = {}
        for name, compute in sweeps.items():  # each sweep is saved as soon as it finishes
            results[name] = run.load_dataset(name)
            if results[name] is None:
                results[name] = compute()
                run.save_dataset(results[name], name)
                run.save_figure(pl.plot_sweep(results[name]), name)
        first = results["resid_pre"]
        clean, corrupted, units = float(first.clean.mean()), float(first.corrupted.mean()), first.attrs["units"]
        run.record(clean_mean=clean, corrupted_mean=corrupted, units=units, metric=config.metric)
        logging.getLogger("patchlab").info("mean %s: clean %+.3f %s, corrupted %+.3f %s",
                                           config.metric, clean, units, corrupted, units)
    print(f"mean {config.metric}: clean {clean:+.3f} {units}, corrupted {corrupted:+.3f} {units}; "
          f"results in {run.path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    main(config_from_args(Config, description=__doc__.split("\n\n")[0]))
