"""Experiment folders, netCDF round trips and provenance, checked against independent facts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

import patchlab as pl
from patchlab.provenance import git_commit

from .test_patching_exact import random_pairs
from .tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def sweep():
    hf = tiny_model("llama")
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), model_id="tiny-llama")
    dataset = random_pairs(hf.config.vocab_size)
    return model, dataset, pl.patch_heads(model, dataset, site="head", per_position=True, seed=7, progress=False)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_result_attrs_carry_provenance(sweep):
    model, dataset, ds = sweep
    attrs = ds.attrs
    assert attrs["model_sha256"] == model.weights_sha256 and attrs["dataset_sha256"] == dataset.sha256()
    assert attrs["metric"] == "logit_diff" and attrs["units"] == "nats" and attrs["direction"] == "denoising"
    assert attrs["seed"] == 7 and attrs["site"] == "head" and attrs["corruption"] == "resample"
    assert attrs["torch_version"] == torch.__version__
    assert "m_corrupted" in attrs["score_formula"]
    assert ds.patched.dims == ("layer", "head", "pos", "prompt")
    assert list(ds.pos_name.values[:2]) == ["", "A"]


def test_netcdf_round_trip_is_identical_without_patchlab(sweep, tmp_path):
    _, _, ds = sweep
    path = tmp_path / "heads.nc"
    ds.to_netcdf(path, engine="netcdf4")
    with xr.open_dataset(path, engine="netcdf4") as back:
        xr.testing.assert_identical(back.load(), ds)
    # A fresh interpreter that never imports patchlab reads the same values.
    code = ("import xarray as xr, sys; d = xr.open_dataset(sys.argv[1], engine='netcdf4'); "
            "assert 'patchlab' not in sys.modules; print(float(d.score.sum()), d.attrs['metric'])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    total, metric = out.stdout.split()
    assert np.isclose(float(total), float(ds.score.sum())) and metric == "logit_diff"


def test_experiment_folder_and_manifest(sweep, tmp_path):
    _, dataset, ds = sweep
    with pl.ExperimentRun("demo", root=tmp_path, config={"n": 3}, seed=7, run_id="r1") as run:
        run.save_prompts(dataset)
        run.save_dataset(ds, "heads")
        run.save_figure(pl.plot_sweep(ds), "heads")
        run.record(clean_mean=float(ds.clean.mean()))
    folder = tmp_path / "demo" / "r1"
    names = {p.name for p in folder.iterdir()}
    assert names == {"prompts.jsonl", "heads.nc", "heads.png", "config.json", "manifest.json", "log.txt"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 7 and manifest["config"] == {"n": 3}
    assert manifest["files"] == {n: sha256(folder / n) for n in ("prompts.jsonl", "heads.nc", "heads.png")}
    assert manifest["facts"]["dataset_sha256"] == sha256(folder / "prompts.jsonl") == dataset.sha256()
    assert pl.PromptPairDataset.from_jsonl(folder / "prompts.jsonl") == dataset
    assert "wrote heads.nc" in (folder / "log.txt").read_text()
    assert (folder / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_keeps_files_and_says_why(sweep, tmp_path):
    _, dataset, _ = sweep
    with pytest.raises(RuntimeError, match="boom"):
        with pl.ExperimentRun("demo", root=tmp_path, config={}, seed=0, run_id="r2") as run:
            run.save_prompts(dataset)
            raise RuntimeError("boom")
    folder = tmp_path / "demo" / "r2"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "boom" in manifest["error"]
    assert (folder / "prompts.jsonl").exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_git_commit_reads_head_of_a_real_repo(tmp_path):
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)
    run("init", "-q")
    (tmp_path / "f").write_text("x")
    run("add", "f")
    run("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "m")
    head = run("rev-parse", "HEAD").stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f").write_text("y")
    assert git_commit(tmp_path) == head + "-dirty"


def test_resume_keeps_finished_results_and_refuses_other_prompts(sweep, tmp_path):
    _, dataset, ds = sweep
    with pl.ExperimentRun("demo", root=tmp_path, config={}, seed=0, run_id="r3") as run:
        run.save_prompts(dataset)
        run.save_dataset(ds, "heads")
        assert run.load_dataset("heads") is None  # not resuming: nothing is reused
    with pl.ExperimentRun("demo", root=tmp_path, config={}, seed=0, run_id="r3", resume=True) as run:
        run.save_prompts(dataset)
        kept = run.load_dataset("heads")
        assert run.load_dataset("other") is None
    xr.testing.assert_identical(kept, ds)
    manifest = json.loads((tmp_path / "demo" / "r3" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"prompts.jsonl", "heads.nc"}
    other = pl.PromptPairDataset(pairs=dataset.pairs[:1], name="random", corruption="resample")
    with pytest.raises(ValueError, match="differs"):
        with pl.ExperimentRun("demo", root=tmp_path, config={}, seed=0, run_id="r3", resume=True) as run:
            run.save_prompts(other)
    with pytest.raises(FileNotFoundError):
        with pl.ExperimentRun("demo", root=tmp_path, config={}, seed=0, run_id="nope", resume=True):
            pass
