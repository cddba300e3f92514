"""Refusal of harmful instructions: the layers and heads that carry it, the refusal direction, a minimal circuit.

On the refusal test-bed ``smollm2-135m-refusal`` (built on first use, see README) or any chat model:

1. data: harmful (clean: the model refuses) against harmless (corrupted: it complies) chat prompts
   (`pl.chat_pairs`), end-aligned at the post-instruction template tokens; length-matched pairs for
   the edge-level steps. Train / val / test splits as in refusal_data/SOURCES.md;
2. metric: the refusal score of Arditi et al. 2024, log-odds of the refusal openers at the last
   position (nats), and the refusal rate of greedy replies (substring markers);
3. activation patching of the residual stream, attention and MLP outputs per layer at the last
   instruction token and each post-instruction position, denoising (harmful into harmless) and
   noising (harmless into harmful); every head's output at the post-instruction positions; a
   figure ranking the layers, with per-prompt spread;
4. the refusal direction: difference in means per layer and post-instruction position (train),
   selected on val (directional ablation at every layer lowers the refusal score most while the KL
   on harmless prompts stays under ``kl_max``, in the first ``max_layer_frac`` of the layers), then
   on test: refusal rates of greedy replies with it projected out everywhere, and added on harmless;
5. the circuit: EAP-IG over every edge, exact scores of the top candidates and the agreement report,
   faithfulness curves on test prompts, the minimal top-k circuit whose faithfulness lies within
   ``[target, 2 - target]`` on test prompts (bisected between the curve's sizes), ACDC over its top
   edges, the circuit drawn (PNG and SVG).

Writes ``results/refusal/<run-id>/``, each file as it finishes; ``--resume RUN_ID`` keeps what an
interrupted run saved.

    python experiments/refusal.py [--model smollm2-135m-refusal] [--remote ndif]
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import patchlab as pl  # noqa: E402
from patchlab import refusal_data  # noqa: E402
from patchlab.circuit import Circuit, rank_edges  # noqa: E402
from patchlab.experiment import config_from_args  # noqa: E402
from patchlab.graph import NodeKind  # noqa: E402
from patchlab.refusal_model import REFUSAL_MODEL  # noqa: E402

C = pl.Component
SITES = ("resid_pre", "attn_out", "mlp_out")
DIRECTIONS = ("denoising", "noising")
COMPLIANCE = ("Here", " Here", "Sure", "The", "To")
"""The ``incorrect`` answers of the pairs; the log-odds metric does not read them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str = REFUSAL_MODEL
    """The refusal test-bed (built on first use), a Hub id of a chat model, or a local folder."""
    n_sweep: int = 6
    """Harmful/harmless train pairs of the activation-patching sweeps."""
    n_direction: int = 32
    """Harmful and harmless train prompts of the difference in means."""
    n_val: int = 4
    """Val pairs that select the direction."""
    n_test: int = 32
    """Harmful and harmless test prompts whose greedy replies are judged."""
    max_new_tokens: int = 24
    kl_max: float = 0.5
    """Largest KL (nats) on harmless val prompts that a selected direction's ablation may cause. Arditi et
    al. use 0.1 on 1.8B-72B models; on the 135M test-bed the best 0.1-KL candidate (L9, second
    post-instruction token) lowers the harmful val refusal score only to -1.85 nats, against -6.51 (see README)."""
    max_layer_frac: float = 0.8
    """Directions are taken from the first fraction of the layers (Arditi et al. drop the last 20%)."""
    n_circuit: int = 6
    """Length-matched train pairs of circuit discovery (and as many test pairs for faithfulness)."""
    ig_steps: int = 3
    exact_top: int = 60
    exact_random: int = 30
    acdc_candidates: int = 80
    """ACDC searches the top EAP-IG edges up to this many, or the minimal circuit's edges if fewer."""
    acdc_tau: float = 0.1
    """ACDC threshold, nats of refusal log-odds."""
    target: float = 0.8
    """Faithfulness the minimal circuit must reach on test prompts (and not exceed 2 - target)."""
    draw_edges: int = 60
    """The circuit diagram draws this many of the minimal circuit's edges, the largest scores."""
    seed: int = 0
    results: str = "results"
    resume: str = ""
    remote: str = ""
    """Run on a hosted model: "ndif", a host URL, or "local"; empty: run here."""


def refusal_pairs(tokenizer, harmful, harmless, *, match_lengths: bool = False, name: str = "refusal"):
    """Harmful (clean) against harmless (corrupted) chat pairs, scored on the refusal openers."""
    return pl.chat_pairs(tokenizer, harmful, harmless, correct=pl.refusal_openers(tokenizer),
                         incorrect=COMPLIANCE,
                         match_lengths=match_lengths, name=name, corruption="harmless instruction")


def layer_ranking(sweeps: dict) -> pd.DataFrame:
    """Per-prompt normalised effects per (site, direction, layer), at each layer's best position.

    Each prompt's effect is ``(patched - base) / (mean clean - mean corrupted)`` with the sign that
    makes 1 the full effect (denoising: harmful behaviour induced; noising: removed).
    """
    rows = []
    for (site, direction), ds in sweeps.items():
        gap = float(ds.clean.mean() - ds.corrupted.mean())
        per_prompt = (ds.patched - ds.corrupted) / gap if direction == "denoising" else (ds.clean - ds.patched) / gap
        best = ds.score.argmax("pos")
        for li, layer in enumerate(ds.layer.values):
            pos = int(best[li])
            for p, value in enumerate(per_prompt.isel(layer=li, pos=pos).values):
                rows.append({"site": site, "direction": direction, "layer": int(layer), "prompt": p,
                             "pos": str(ds.pos.values[pos]), "effect": float(value)})
    return pd.DataFrame(rows)


def rank_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Layers ranked by the mean effect of their attention and MLP outputs (both directions)."""
    parts = table[table.site != "resid_pre"].groupby(["layer", "site", "direction"]).effect.mean().reset_index()
    return parts.groupby("layer").effect.sum().div(4).sort_values(ascending=False).rename("contribution").to_frame()


def plot_layer_ranking(table: pd.DataFrame, ranked: pd.DataFrame, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS):
        sns.pointplot(data=table[table.direction == direction], x="layer", y="effect", hue="site", errorbar="sd",
                      dodge=0.4, linestyle="none", markersize=3, ax=ax)
        ax.axhline(0, color="black", lw=0.6)
        what = "harmful into harmless" if direction == "denoising" else "harmless into harmful"
        ax.set_title(f"{direction} ({what})")
        ax.set_ylabel("normalised effect on the refusal score (mean, sd over prompts)")
    top = ", ".join(f"L{layer}" for layer in ranked.index[:5])
    fig.suptitle(f"{title}; layers ranked by attention + MLP contribution: {top}", fontsize=10)
    fig.tight_layout()
    return fig


def ablate_everywhere(model, r) -> list:
    """Directional ablation of `r` from every layer's residual stream, attention and MLP output."""
    return [pl.ProjectOut(C(site=site, layer=layer), r) for layer in range(model.layout.n_layers) for site in SITES]


def select_direction(model, directions: xr.Dataset, val, val_reversed, config: Config, *, progress: bool = True):
    """Every candidate's scores on val, over layer and pos (one sweep per layer, so an interrupted
    selection shows its progress); attrs ``chosen`` ("L<layer>/<pos>")."""
    n_layers = model.layout.n_layers
    layers = [int(layer) for layer in directions.layer.values if layer < config.max_layer_frac * n_layers]
    # where harmful and harmless prompts cannot differ (the embeddings of the same template token) the direction is 0
    nonzero = directions.norm > 1e-6 * float(directions.norm.max())
    layers = [layer for layer in layers if bool(nonzero.sel(layer=layer).all())]
    ablated, kl = [], []
    for layer in tqdm(layers, desc="refusal direction candidates", unit="layer", disable=not progress):
        rows = {str(pos): ablate_everywhere(model, directions.direction.sel(layer=layer, pos=pos).values)
                for pos in directions.pos.values}
        ablated.append(pl.sweep_interventions(model, val, rows, base="clean", metric="log_odds", progress=False))
        kl.append(pl.sweep_interventions(model, val_reversed, rows, base="clean", metric="kl", progress=False))
    mean = lambda sweeps: np.stack([s.patched.mean("prompt").values for s in sweeps])  # noqa: E731 [layer, pos]
    ds = xr.Dataset({"ablated_refusal_score": (("layer", "pos"), mean(ablated),
                                               {"units": "nats", "long_name": "harmful val, direction ablated"}),
                     "harmless_kl": (("layer", "pos"), mean(kl),
                                     {"units": "nats", "long_name": "KL(harmless || harmless, direction ablated)"})},
                    coords={"layer": layers, "pos": directions.pos.values},
                    attrs={"harmful_refusal_score": float(ablated[0].clean.mean()),
                           "harmless_refusal_score": float(ablated[0].corrupted.mean()), "kl_max": config.kl_max})
    allowed = ds.ablated_refusal_score.where(ds.harmless_kl < config.kl_max)
    pick = allowed if bool(allowed.notnull().any()) else ds.ablated_refusal_score
    best = pick.stack(c=("layer", "pos")).dropna("c").idxmin("c").item()
    ds.attrs["chosen"] = f"L{best[0]}/{best[1]}"
    ds.attrs["kl_filter_met"] = int(pick is allowed)
    return ds


def minimal_size(curve: xr.Dataset, target: float) -> tuple[int, bool]:
    """The smallest top-k size whose faithfulness lies within ``[target, 2 - target]``, and True;
    where none does, the size whose faithfulness is closest to 1, and False.

    ``curve`` is a `pl.faithfulness_curve` (dim ``n_edges``); overshooting (faithfulness above
    ``2 - target``) is as far from the full model's behaviour as falling short.
    """
    f = curve.faithfulness
    good = f.where(abs(f - 1) <= 1 - target, drop=True)
    if good.size:
        return int(good.n_edges.min()), True
    return int(curve.n_edges[int(abs(f - 1).argmin())]), False


def refine_curve(model, dataset, scores: xr.Dataset, curve: xr.Dataset, target: float, *,
                 rel: float = 0.02) -> xr.Dataset:
    """`curve` with more sizes, bisected between the minimal size (`minimal_size`) and the largest
    smaller size of `curve`, until they are within ``rel`` of each other: the minimal size of the
    result is the smallest found (the curve need not be monotone, so a smaller faithful size may exist)."""
    k, reached = minimal_size(curve, target)
    below = curve.n_edges.where(curve.n_edges < k, drop=True)
    if not reached or not below.size:
        return curve
    lo, hi, points = int(below.max()), k, [curve]
    while hi - lo > max(1, int(rel * hi)):
        mid = (lo + hi) // 2
        point = pl.faithfulness_curve(model, dataset, scores, sizes=[mid], metric="log_odds", progress=False)
        points.append(point)
        if abs(float(point.faithfulness[0]) - 1) <= 1 - target:
            hi = mid
        else:
            lo = mid
    return xr.concat(points, "n_edges", data_vars="minimal", coords="minimal", compat="override",
                     combine_attrs="override").sortby("n_edges")


def circuit_nodes(circuit: Circuit) -> dict:
    """The heads, key/value heads and MLPs a circuit's edges touch (labels: "L3H1", "L3KV0", "L5.mlp"),
    and the layers they sit in."""
    nodes = sorted({n for e in circuit.edges for n in (e.sender, e.receiver)}, key=lambda n: n.sort_key)
    return {"heads": [n.label for n in nodes if n.kind is NodeKind.HEAD],
            "kv_heads": [n.label for n in nodes if n.kind is NodeKind.KV_HEAD],
            "mlps": [n.label for n in nodes if n.kind is NodeKind.MLP],
            "layers": sorted({int(n.layer) for n in nodes if n.layer is not None})}


def judged(model, prompts, interventions=(), *, max_new_tokens: int):
    out = pl.generate(model, prompts, interventions, max_new_tokens=max_new_tokens)
    texts = [str(t) for t in out.text.values]
    return [{"prompt": p, "reply": t, "refusal": pl.is_refusal(t)} for p, t in zip(prompts, texts)]


def main(config: Config, model=None) -> dict:
    started = time.perf_counter()
    model = model or pl.load_model(config.model, remote=config.remote or False)
    tok, seed = model.tokenizer, config.seed
    inst = refusal_data.instructions
    sweep = refusal_pairs(tok, inst("harmful", "train")[:config.n_sweep], inst("harmless", "train")[:config.n_sweep])
    train = refusal_pairs(tok, inst("harmful", "train")[:config.n_direction],
                          inst("harmless", "train")[:config.n_direction])
    val = refusal_pairs(tok, inst("harmful", "val")[:config.n_val], inst("harmless", "val")[:config.n_val])
    val_reversed = refusal_pairs(tok, inst("harmless", "val")[:config.n_val], inst("harmful", "val")[:config.n_val])
    circuit_train = _first(refusal_pairs(tok, inst("harmful", "train"), inst("harmless", "train"),
                                         match_lengths=True), config.n_circuit)
    circuit_test = _first(refusal_pairs(tok, inst("harmful", "test"), inst("harmless", "test"), match_lengths=True),
                          config.n_circuit)
    post = sorted((p for p in sweep.pairs[0].positions if p.startswith("post_instruction")),
                  key=lambda p: int(p.rsplit("_", 1)[1]))
    positions = ["last_instruction", *post]
    facts = {}
    with pl.ExperimentRun("refusal", root=config.results, config=config, seed=seed,
                          run_id=config.resume or None, resume=bool(config.resume)) as run:
        run.save_prompts(sweep)
        run.record(model_id=model.model_id, model_sha256=model.weights_sha256, remote=config.remote)
        run.save_prompts(circuit_train, "prompts_circuit_train")
        run.save_prompts(circuit_test, "prompts_circuit_test")

        # 3. which layers contribute
        sweeps = {(site, d): run.step(f"sweep_{site}_{d}", lambda site=site, d=d: pl.patch_layer_pos(
            model, sweep, site=site, positions=positions, metric="log_odds", direction=d, seed=seed, progress=False))
            for site in SITES for d in DIRECTIONS}
        head_rows = [[C(site="head", layer=layer, head=h, pos=p) for p in post]
                     for layer in range(model.layout.n_layers) for h in range(model.layout.n_heads)]
        heads = {d: run.step(f"heads_{d}", lambda d=d: pl.patch_components(model, sweep, head_rows, metric="log_odds",
                                                                          direction=d, seed=seed, progress=False))
                 for d in DIRECTIONS}
        table = layer_ranking(sweeps)
        ranked = rank_layers(table)
        run.save_json({"ranking": [{"layer": int(k), "contribution": float(v)} for k, v in ranked.contribution.items()],
                       "per_prompt": table.to_dict("records")}, "layer_ranking")
        run.save_figure(plot_layer_ranking(table, ranked, model.model_id), "layer_ranking", formats=("png", "svg"))
        head_scores = {d: _head_ranking(ds, model) for d, ds in heads.items()}
        facts.update(clean_refusal_score=float(sweeps[("resid_pre", "denoising")].clean.mean()),
                     corrupted_refusal_score=float(sweeps[("resid_pre", "denoising")].corrupted.mean()),
                     top_layers=[int(k) for k in ranked.index[:5]],
                     **{f"top_heads_{d}": [f"{label} {score:+.2f}" for label, score in ranking[:5]]
                        for d, ranking in head_scores.items()})

        # 4. the refusal direction
        directions = run.step("directions", lambda: pl.mean_difference(model, train, positions=post))
        selection = run.step("direction_selection", lambda: select_direction(model, directions, val, val_reversed,
                                                                         config))
        layer, pos = selection.attrs["chosen"][1:].split("/")
        layer = int(layer)
        r = directions.direction.sel(layer=layer, pos=pos).values
        harmful_test = [pl.chat_prompt(tok, x)[0] for x in inst("harmful", "test")[:config.n_test]]
        harmless_test = [pl.chat_prompt(tok, x)[0] for x in inst("harmless", "test")[:config.n_test]]
        generations = {}
        for name, prompts, interventions in (
                ("harmful_baseline", harmful_test, ()), ("harmful_direction_ablated", harmful_test,
                                                         ablate_everywhere(model, r)),
                ("harmless_baseline", harmless_test, ()),
                ("harmless_direction_added", harmless_test, [pl.Steer(C(site="resid_pre", layer=layer), r)])):
            generations[name] = run.load_jsonl(f"generations_{name}")
            if generations[name] is None:
                generations[name] = judged(model, prompts, interventions, max_new_tokens=config.max_new_tokens)
                run.save_jsonl(generations[name], f"generations_{name}")
        rates = {name: float(np.mean([g["refusal"] for g in gens])) for name, gens in generations.items()}
        facts.update(direction_layer=layer, direction_pos=pos, n_layers=model.layout.n_layers,
                     direction_kl_filter_met=bool(selection.attrs["kl_filter_met"]), refusal_rates=rates)

        # 5. the circuit
        scores = run.step("scores_eap_ig", lambda: pl.eap_ig(model, circuit_train, steps=config.ig_steps,
                                                         metric="log_odds", seed=seed))
        ranked_edges = rank_edges(scores)
        others = ranked_edges[config.exact_top:]
        sample = ranked_edges[:config.exact_top] + random.Random(seed).sample(others, min(config.exact_random,
                                                                                         len(others)))
        exact = run.step("scores_exact_sample", lambda: pl.exact_edge_scores(model, circuit_train, edges=sample,
                                                                          metric="log_odds", seed=seed))
        report = pl.agreement(scores, exact)
        run.save_dataset(report, "agreement_eap_ig")
        sizes = sorted({0, *[int(k) for k in np.unique(np.round(np.geomspace(1, len(ranked_edges), 18)))]})
        curve = run.step("curve_eap_ig_test", lambda: pl.faithfulness_curve(model, circuit_test, scores, sizes=sizes,
                                                                        metric="log_odds", progress=False))
        curve = run.step("curve_eap_ig_test_refined", lambda: refine_curve(model, circuit_test, scores, curve,
                                                                           config.target))
        k, reached = minimal_size(curve, config.target)
        minimal = Circuit.top_k(scores, k)
        acdc_ds = run.load_dataset("circuit_acdc")
        if acdc_ds is None:
            acdc = pl.acdc(model, circuit_train, tau=config.acdc_tau, metric="log_odds",
                           candidates=ranked_edges[:min(k, config.acdc_candidates)], seed=seed, progress=False,
                           checkpoint=run.path / "acdc_checkpoint.json")
            run.save_dataset(acdc.to_dataset(), "circuit_acdc")
        else:
            acdc = Circuit.from_dataset(acdc_ds)
        evaluation = run.step("faithfulness_test", lambda: pl.evaluate_circuits(
            model, circuit_test, [minimal, acdc], labels=["minimal", "acdc"], metric="log_odds", progress=False))
        run.save_dataset(minimal.to_dataset(), "circuit_minimal")
        run.save_json(minimal.to_json(), "circuit_minimal")
        run.save_json(acdc.to_json(), "circuit_acdc")
        f_min, f_acdc = (float(evaluation.faithfulness.sel(circuit=c)) for c in ("minimal", "acdc"))
        nodes = circuit_nodes(minimal)
        run.save_figure(pl.plot_circuit(minimal, max_edges=config.draw_edges,
                                        title=f"refusal, minimal circuit: EAP-IG top {k} edges, "
                                        f"faithfulness {f_min:.2f} on test prompts"),
                        "circuit_minimal", formats=("png", "svg"))
        run.save_figure(pl.plot_faithfulness_curves({"EAP-IG (test prompts)": curve},
                                                    title="refusal: faithfulness of the top-k EAP-IG edges"),
                        "faithfulness_curves", formats=("png", "svg"))
        top_heads = {label for ranking in head_scores.values() for label, _ in ranking[:10]}
        facts.update(minimal_circuit_edges=k, minimal_circuit_faithfulness=f_min,
                     minimal_circuit_reached_target=reached, minimal_circuit_heads=nodes["heads"],
                     minimal_circuit_kv_heads=nodes["kv_heads"], minimal_circuit_mlps=nodes["mlps"],
                     minimal_circuit_top_layers=[x for x in facts["top_layers"] if x in nodes["layers"]],
                     minimal_circuit_top_heads=sorted(top_heads & set(nodes["heads"])),
                     minimal_circuit_layers_above_direction=[x for x in nodes["layers"] if x > layer],
                     acdc_edges=len(acdc), acdc_faithfulness=f_acdc, n_graph_edges=len(ranked_edges),
                     eap_ig_spearman=float(report.attrs["spearman"]),
                     seconds=round(time.perf_counter() - started, 1))
        run.record(**{k_: v for k_, v in facts.items()})
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"results in {run.path}")
    return facts


def _first(dataset, n):
    return pl.PromptPairDataset(pairs=dataset.pairs[:n], name=dataset.name, corruption=dataset.corruption)


def _head_ranking(ds: xr.Dataset, model) -> list[tuple[str, float]]:
    """Heads by their normalised score at the post-instruction positions, best first."""
    scores = ds.score.values.reshape(model.layout.n_layers, model.layout.n_heads)
    order = np.argsort(-scores, axis=None)
    return [(f"L{i // model.layout.n_heads}H{i % model.layout.n_heads}", float(scores.flat[i])) for i in order]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    main(config_from_args(Config, description=__doc__.split("\n\n")[0]))
