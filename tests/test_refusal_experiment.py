"""experiments/refusal.py's steps on a tiny chat model (float64), with word-level stand-ins for the
refusal splits: every file of the folder, its numbers against plain forward passes and closed forms,
and a resumed run that recomputes nothing."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import patchlab as pl
from patchlab import refusal_data
from tests.test_refusal import chat_tokenizer
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
OPENERS, COMPLIANCE = ("w5", "w6"), ("w7",)


@pytest.fixture
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("refusal_experiment", ROOT / "experiments" / "refusal.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "refusal_experiment", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "COMPLIANCE", COMPLIANCE)
    monkeypatch.setattr(pl, "refusal_openers", lambda tokenizer: OPENERS)
    monkeypatch.setattr(refusal_data, "instructions", stand_in_instructions)
    return module


def stand_in_instructions(kind: str, split: str) -> list[str]:
    """Ten instructions per split, 2 to 4 words: harmful ones use words w10..w29, harmless w30..w49."""
    offset = {"harmful": 10, "harmless": 30}[kind] + {"train": 0, "val": 3, "test": 6}[split]
    return [" ".join(f"w{offset + (i * 7 + j) % 20}" for j in range(2 + i % 3)) for i in range(10)]


CONFIG = dict(n_sweep=3, n_direction=4, n_val=3, n_test=3, max_new_tokens=3, n_circuit=2, ig_steps=2, exact_top=5,
              exact_random=3, acdc_candidates=6, acdc_tau=0.0, draw_edges=4)


@pytest.fixture
def model():
    return pl.load_model(tiny_model("llama"), tokenizer=chat_tokenizer(), dtype=torch.float64)


def log_odds_alone(model, instruction: str) -> float:
    """The refusal score of one chat prompt from a plain forward pass of the Hugging Face model."""
    ids = torch.tensor([model.tokenizer(pl.chat_prompt(model.tokenizer, instruction)[0])["input_ids"]])
    with torch.no_grad():
        p = torch.softmax(model.hf(ids).logits[0, -1].double(), -1)
    opener_ids = sorted({model.tokenizer.convert_tokens_to_ids(t) for t in OPENERS})
    q = p[opener_ids].sum()
    return float(torch.log(q) - torch.log1p(-q))


def test_the_experiment_writes_every_step_and_a_resumed_run_recomputes_nothing(script, model, tmp_path,
                                                                               monkeypatch):
    config = script.Config(results=str(tmp_path), **CONFIG)
    facts = script.main(config, model=model)
    folder = next((tmp_path / "refusal").iterdir())
    names = {p.name for p in folder.iterdir()}
    expected = {f"sweep_{site}_{d}.nc" for site in script.SITES for d in script.DIRECTIONS}
    expected |= {f"heads_{d}.nc" for d in script.DIRECTIONS}
    expected |= {"directions.nc", "direction_selection.nc", "scores_eap_ig.nc", "scores_exact_sample.nc",
                 "agreement_eap_ig.nc", "curve_eap_ig_test.nc",
                 "curve_eap_ig_test_refined.nc", "faithfulness_test.nc", "circuit_minimal.nc",
                 "circuit_minimal.json", "circuit_acdc.nc", "circuit_acdc.json", "layer_ranking.json",
                 "manifest.json"}
    expected |= {f"generations_{g}.jsonl" for g in ("harmful_baseline", "harmful_direction_ablated",
                                                      "harmless_baseline", "harmless_direction_added")}
    expected |= {f"{fig}.{ext}" for fig in ("layer_ranking", "circuit_minimal", "faithfulness_curves")
                 for ext in ("png", "svg")}
    assert expected <= names, expected - names

    # the clean and corrupted refusal scores are those of each prompt run alone
    sweep = xr.load_dataset(folder / "sweep_resid_pre_denoising.nc")
    harmful, harmless = (stand_in_instructions(k, "train")[:CONFIG["n_sweep"]] for k in ("harmful", "harmless"))
    np.testing.assert_allclose(sweep.clean.values, [log_odds_alone(model, x) for x in harmful], rtol=0, atol=1e-9)
    np.testing.assert_allclose(sweep.corrupted.values, [log_odds_alone(model, x) for x in harmless], rtol=0,
                               atol=1e-9)
    assert facts["clean_refusal_score"] == pytest.approx(float(sweep.clean.mean()), abs=1e-12)

    # layer 0's residual stream is the template tokens' embedding, the same for both: no direction there
    selection = xr.load_dataset(folder / "direction_selection.nc")
    assert 0 not in selection.layer.values and set(selection.layer.values) <= {1, 2}
    allowed = selection.ablated_refusal_score.where(selection.harmless_kl < config.kl_max)
    pick = allowed if bool(allowed.notnull().any()) else selection.ablated_refusal_score
    assert float(pick.sel(layer=facts["direction_layer"], pos=facts["direction_pos"])) == float(pick.min())

    # the minimal circuit is the smallest curve size within [target, 2 - target], or the closest to 1
    coarse, curve = (xr.load_dataset(folder / f"{name}.nc") for name in ("curve_eap_ig_test",
                                                                          "curve_eap_ig_test_refined"))
    assert set(coarse.n_edges.values) <= set(curve.n_edges.values)
    within = [int(k) for k, f in zip(curve.n_edges.values, curve.faithfulness.values) if abs(f - 1) <= 0.2]
    closest = int(curve.n_edges.values[np.argmin(abs(curve.faithfulness.values - 1))])
    assert facts["minimal_circuit_edges"] == (min(within) if within else closest)
    assert facts["minimal_circuit_reached_target"] == bool(within)
    minimal = json.loads((folder / "circuit_minimal.json").read_text())
    assert len(minimal["edges"]) == facts["minimal_circuit_edges"]
    for line in (folder / "generations_harmful_baseline.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["refusal"] == pl.is_refusal(row["reply"])

    def recomputed(*args, **kwargs):
        raise AssertionError("a resumed run recomputed a saved step")

    for name in ("patch_layer_pos", "patch_components", "mean_difference", "sweep_interventions", "generate",
                 "eap_ig", "exact_edge_scores", "faithfulness_curve", "acdc", "evaluate_circuits"):
        monkeypatch.setattr(pl, name, recomputed)
    again = script.main(script.Config(results=str(tmp_path), resume=folder.name, **CONFIG), model=model)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in facts.items() if k != "seconds"}


def test_minimal_size_is_the_smallest_faithful_size_or_the_closest(script):
    curve = lambda f: xr.Dataset({"faithfulness": ("n_edges", f)}, coords={"n_edges": [0, 1, 3, 10, 30]})  # noqa
    assert script.minimal_size(curve([0.0, 0.5, 2.75, 0.85, 1.0]), 0.8) == (10, True)  # 2.75 overshoots
    assert script.minimal_size(curve([0.0, 0.5, 1.19, 0.85, 1.0]), 0.8) == (3, True)
    assert script.minimal_size(curve([0.0, 0.5, 1.4, 0.7, 1.3]), 0.8) == (10, False)


def test_refined_curve_bisects_to_the_smallest_faithful_size(script, monkeypatch):
    # faithfulness of the top k edges: k / 100 (monotone), target 0.8: the smallest faithful size is 80
    curve = lambda ks: xr.Dataset({"faithfulness": ("n_edges", [k / 100 for k in ks])},  # noqa: E731
                                  coords={"n_edges": ks})
    monkeypatch.setattr(pl, "faithfulness_curve", lambda model, dataset, scores, sizes, **kw: curve(sizes))
    refined = script.refine_curve(None, None, None, curve([0, 10, 50, 100]), 0.8, rel=0.0)
    assert script.minimal_size(refined, 0.8) == (80, True)
    assert {0, 10, 50, 100} <= set(refined.n_edges.values)


def test_layer_ranking_normalises_each_prompt_by_the_mean_gap(script):
    # two prompts, two layers, one position: clean 3 and 1 (mean 2), corrupted -1 and -3 (mean -2): gap 4
    ds = xr.Dataset({"patched": (("prompt", "layer", "pos"), [[[1.0], [-1.0]], [[2.0], [-3.0]]]),
                     "clean": ("prompt", [3.0, 1.0]), "corrupted": ("prompt", [-1.0, -3.0]),
                     "score": (("layer", "pos"), [[1.0], [0.0]])},
                    coords={"layer": [0, 1], "pos": ["p"]})
    table = script.layer_ranking({("attn_out", "denoising"): ds, ("mlp_out", "noising"): ds})
    den = table[table.direction == "denoising"].set_index(["layer", "prompt"]).effect
    assert den[(0, 0)] == (1 - -1) / 4 and den[(0, 1)] == (2 - -3) / 4 and den[(1, 1)] == 0
    noi = table[table.direction == "noising"].set_index(["layer", "prompt"]).effect
    assert noi[(0, 0)] == (3 - 1) / 4 and noi[(1, 0)] == (3 - -1) / 4
    ranked = script.rank_layers(table)
    assert ranked.contribution[0] == pytest.approx(((2 / 4 + 5 / 4) / 2 + (2 / 4 - 1 / 4) / 2) / 4)
