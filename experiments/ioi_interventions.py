"""Your own interventions on IOI: knock out the name movers, then restore S2.

Wang et al. 2022, "Interpretability in the Wild" (arXiv 2211.00593). On a seeded IOI dataset
(name-swap corruption) this experiment:

1. sweeps every head's output (denoising) and the residual stream at S2 and END per layer;
2. takes as name-mover candidates the top heads of the head sweep at or after the layer where
   the residual stream's information has moved from S2 to END;
3. mean-ablates them in the clean run (`pl.Ablate(..., how="mean")`) and measures the logit
   difference;
4. from the corrupted run, patches the clean residual stream at S2 back (`pl.Patch`) at a layer
   before that hand-over, alone and with the name movers mean-ablated, and measures again.

It writes ``results/ioi_interventions/<run-id>/`` (netCDF results, a figure, prompts, config,
manifest). ``python experiments/ioi_interventions.py [--top-k 3] [--n-prompts 8]``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

import patchlab as pl  # noqa: E402
from patchlab.experiment import config_from_args  # noqa: E402

C = pl.Component


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str = pl.DEFAULT_MODEL
    """Embedded short name, Hugging Face Hub id, or local folder."""
    n_prompts: int = 8
    """IOI prompts in the dataset."""
    top_k: int = 3
    """How many name-mover candidates to knock out."""
    seed: int = 0
    """Seed of the dataset generator."""
    results: str = "results"
    """Folder that receives results/ioi_interventions/<run-id>/."""
    resume: str = ""
    """Run id of an interrupted run to finish: steps it already saved are kept."""


def main(config: Config) -> dict:
    model = pl.load_model(config.model)
    dataset = pl.ioi_dataset(model.tokenizer, n_prompts=config.n_prompts, corruption="name_swap", seed=config.seed)
    log = logging.getLogger("patchlab")
    with pl.ExperimentRun("ioi_interventions", root=config.results, config=config, seed=config.seed,
                          run_id=config.resume or None, resume=bool(config.resume)) as run:
        run.save_prompts(dataset)
        run.record(model_id=model.model_id, model_sha256=model.weights_sha256, dataset_sha256=dataset.sha256())

        heads = run.step("heads", lambda: pl.patch_heads(model, dataset, site="head", seed=config.seed))
        resid = run.step("resid_s2_end", lambda: pl.patch_layer_pos(model, dataset, site="resid_pre",
                                                                positions=["S2", "END"], seed=config.seed))
        at_s2, at_end = resid.score.isel(pos=0), resid.score.isel(pos=1)
        handover = int(resid.layer[(at_end > at_s2).values].min())  # first layer where END carries more than S2
        late = heads.score.where(heads.layer >= handover).stack(h=("layer", "head")).dropna("h")
        top = late.sortby(late, ascending=False).isel(h=slice(0, config.top_k))
        movers = [C(site="head", layer=int(layer), head=int(head)) for layer, head in top.h.values]
        knockout = [pl.Ablate(h, how="mean") for h in movers]
        log.info("hand-over layer %d; name-mover candidates %s", handover, [h.label for h in movers])

        knocked = run.step("knockout", lambda: pl.run_interventions(model, dataset, knockout, base="clean",
                                                                seed=config.seed))
        restore_layer = max(0, handover - 2)
        s2 = pl.Patch(C(site="resid_pre", layer=restore_layer, pos="S2"), source="clean")
        rows = {"S2 restored": [s2], "S2 restored, name movers mean-ablated": [s2, *knockout],
                "name movers mean-ablated": knockout}
        restored = run.step("restore_s2", lambda: pl.sweep_interventions(model, dataset, rows, base="corrupted",
                                                                     seed=config.seed))
        numbers = {
            "handover_layer": handover, "name_movers": ",".join(h.label for h in movers),
            "name_mover_scores": ",".join(f"{float(s):.3f}" for s in top.values),
            "clean": float(knocked.clean.mean()), "corrupted": float(knocked.corrupted.mean()),
            "clean_movers_ablated": float(knocked.patched.mean()), "knockout_score": float(knocked.score),
            "restore_layer": restore_layer,
            **{f"corrupted_{k.replace(' ', '_').replace(',', '')}": float(restored.patched.sel(row=k).mean())
               for k in rows},
            **{f"score_{k.replace(' ', '_').replace(',', '')}": float(restored.score.sel(row=k)) for k in rows},
        }
        run.record(**numbers)
        fig, ax = plt.subplots(figsize=(9, 3))
        bars = {"clean": numbers["clean"], "clean, movers ablated": numbers["clean_movers_ablated"],
                "corrupted": numbers["corrupted"],
                **{f"corrupted, {k}": float(restored.patched.sel(row=k).mean()) for k in rows}}
        sns.barplot(x=list(bars.values()), y=list(bars.keys()), ax=ax, color="tab:blue")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"mean logit difference (IO - S), {knocked.attrs['units']}")
        ax.set_title(f"{model.model_id}: name movers {numbers['name_movers']}; S2 restored at L{restore_layer}",
                     fontsize=10)
        fig.tight_layout()
        run.save_figure(fig, "interventions")
        plt.close(fig)
    for key, value in numbers.items():
        print(f"{key}: {value:+.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"results in {run.path}")
    return numbers


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    main(config_from_args(Config, description=__doc__.split("\n\n")[0]))
