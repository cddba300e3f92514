"""Experiment folders, netCDF round trips and provenance, checked against independent facts."""

from __future__ import annotations

import hashlib
import json
import os
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


# ---- ExperimentRun without a model: folder layout, atomic writes, logging, errors -------------

import dataclasses  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from patchlab import experiment as experiment_module  # noqa: E402
from patchlab.experiment import atomic_write_text  # noqa: E402
from patchlab.provenance import provenance_attrs, versions  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cfg:
    out: Path = Path("a/b")
    layers: tuple[int, ...] = (1, 2)
    name: str = "x"


def small_result() -> xr.Dataset:
    rng = np.random.default_rng(3)
    attrs = provenance_attrs(model_id="m", model_sha256="ab" * 32, dataset_sha256="cd" * 32, seed=1,
                             metric="logit_diff", units="nats", direction="denoising", site="resid_pre")
    return xr.Dataset(
        {"patched": (("layer", "pos", "prompt"), rng.normal(size=(2, 3, 2)), {"units": "nats"}),
         "score": (("layer", "pos"), rng.normal(size=(2, 3))),
         "clean": (("prompt",), np.array([3.0, 3.5])), "corrupted": (("prompt",), np.array([-3.0, -3.5]))},
        coords={"layer": [0, 1], "pos": [0, 1, 2], "prompt": [0, 1],
                "token": ("pos", np.asarray(["When", " Mary", " to"], dtype=str)),
                "pos_name": ("pos", np.asarray(["", "IO", "END"], dtype=str))},
        attrs=attrs)


def test_config_manifest_and_netcdf_round_trip_without_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = small_result()
    with pl.ExperimentRun("exp", root=tmp_path / "res", config=Cfg(), seed=3) as run:
        path = run.save_dataset(ds, "sweep")
        logging.getLogger("patchlab.test").info("hello from inside")
    assert re.fullmatch(r"\d{8}T\d{6}Z", run.path.name) and run.path.parent == tmp_path / "res" / "exp"
    assert json.loads((run.path / "config.json").read_text()) == {"out": "a/b", "layers": [1, 2], "name": "x"}
    with xr.open_dataset(path, engine="netcdf4") as back:
        loaded = back.load()
    xr.testing.assert_identical(loaded, ds)  # provenance attrs included
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["experiment"] == "exp" and manifest["run_id"] == run.path.name
    assert manifest["command"] == [sys.executable, *sys.argv]
    assert manifest["versions"] == versions() and manifest["config"]["out"] == "a/b"
    assert {"hostname", "device"} <= set(manifest["machine"]) and manifest["wall_seconds"] >= 0
    start, end = (datetime.fromisoformat(manifest[k]) for k in ("started", "finished"))
    assert start <= end
    assert manifest["files"] == {"sweep.nc": sha256(path)}
    log_text = (run.path / "log.txt").read_text()
    assert "started" in log_text and "hello from inside" in log_text


def test_log_handler_is_removed_and_level_restored(tmp_path):
    logger = logging.getLogger("patchlab")
    handlers, level = list(logger.handlers), logger.level
    with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="a", command=["x"]) as run:
        assert len(logger.handlers) == len(handlers) + 1
    logger.warning("after the run")
    assert logger.handlers == handlers and logger.level == level
    assert "after the run" not in (run.path / "log.txt").read_text()


def test_run_ids_never_reuse_a_folder(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 21, 10, 15, 30, tzinfo=timezone.utc)

    monkeypatch.setattr(experiment_module, "datetime", Frozen)
    names = []
    for _ in range(3):
        with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, command=["x"]) as run:
            names.append(run.path.name)
    assert names == ["20261121T101530Z", "20261121T101530Z-2", "20261121T101530Z-3"]
    with pytest.raises(FileExistsError):
        with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="20261121T101530Z"):
            pass


def test_outputs_need_an_open_run(tmp_path):
    run = pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0)
    with pytest.raises(RuntimeError, match="context manager"):
        run.save_dataset(small_result(), "x")
    assert not (tmp_path / "exp").exists()


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="f", command=["x"]) as run:
        (path,) = run.save_figure(fig, "line")
    assert not plt.fignum_exists(fig.number)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and 100 <= image.shape[1] <= 300  # ~2 in at 150 dpi, cropped tight
    assert json.loads((run.path / "manifest.json").read_text())["files"] == {"line.png": sha256(path)}


def test_save_figure_writes_reproducible_svg(tmp_path):
    texts = []
    for run_id in ("a", "b"):
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.plot([0, 1], [0, 1])
        with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id=run_id, command=["x"]) as run:
            png, svg = run.save_figure(fig, "line", formats=("png", "svg"))
        assert png.suffix == ".png" and svg.suffix == ".svg"
        texts.append(svg.read_text())
    assert texts[0].lstrip().startswith("<?xml") and texts[0] == texts[1]
    with pytest.raises(ValueError, match="png, svg or pdf"):
        with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="c", command=["x"]) as run:
            run.save_figure(plt.figure(), "x", formats=("jpg",))


def test_a_failed_write_leaves_no_partial_file_and_marks_the_run_failed(tmp_path):
    bad = small_result()
    bad.attrs["nested"] = {"a": 1}  # netCDF cannot store it: to_netcdf raises
    good = small_result()
    with pytest.raises((TypeError, ValueError)):
        with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="w", command=["x"]) as run:
            run.save_dataset(good, "good")
            run.save_dataset(bad, "bad")
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["config.json", "good.nc", "log.txt", "manifest.json"]  # no bad.nc, no temp files
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]
    assert manifest["files"] == {"good.nc": sha256(run.path / "good.nc")}
    assert "failed" in (run.path / "log.txt").read_text()


def test_atomic_write_text_keeps_the_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old\n")
    assert target.read_text() == "old\n"

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_config_from_args():
    import dataclasses

    from patchlab.experiment import config_from_args

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        n_prompts: int = 8
        order: str = "ABBA"

    assert config_from_args(Config, []) == Config()
    assert config_from_args(Config, ["--n-prompts", "3", "--order", "BABA"]) == Config(n_prompts=3, order="BABA")
    with pytest.raises(SystemExit):
        config_from_args(Config, ["--n-prompts", "three"])


def test_save_json_is_recorded_in_the_manifest(tmp_path):
    with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="j", command=["x"]) as run:
        path = run.save_json({"edges": ["L1H2->logits"]}, "circuit")
    assert json.loads(path.read_text()) == {"edges": ["L1H2->logits"]}
    assert json.loads((run.path / "manifest.json").read_text())["files"] == {"circuit.json": sha256(path)}


# ---- the manifest while a run goes, killed runs, resuming ------------------------------------

import signal  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402

KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np, xarray as xr
    import patchlab as pl

    root, run_id = sys.argv[1], sys.argv[2]
    with pl.ExperimentRun("exp", root=root, config={"n": 3, "resume": ""}, seed=5, run_id=run_id,
                          command=["child"]) as run:
        run.save_dataset(xr.Dataset({"x": ("i", np.arange(3.0))}), "first")
        fig, ax = plt.subplots(figsize=(1, 1))
        run.save_figure(fig, "first")
        run.record(model_sha256="ab" * 32)
        print("saved", flush=True)
        time.sleep(120)
""")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_manifest_is_running_while_the_run_is_open_and_follows_every_write(tmp_path):
    with pl.ExperimentRun("exp", root=tmp_path, config={"n": 1}, seed=2, run_id="o", command=["x"]) as run:
        manifest = json.loads((run.path / "manifest.json").read_text())
        assert manifest["status"] == "running" and manifest["finished"] is None
        assert manifest["files"] == {} and manifest["config"] == {"n": 1} and manifest["pid"] == os.getpid()
        path = run.save_dataset(small_result(), "sweep")
        assert json.loads((run.path / "manifest.json").read_text())["files"] == {"sweep.nc": sha256(path)}
        run.record(clean_mean=3.25)
        manifest = json.loads((run.path / "manifest.json").read_text())
        assert manifest["status"] == "running" and manifest["facts"] == {"clean_mean": 3.25}
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "completed" and datetime.fromisoformat(manifest["finished"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_leaves_its_manifest_and_resumes(tmp_path, signum):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(tmp_path), "k"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line == "saved\n", proc.communicate()[1]
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
    folder = tmp_path / "exp" / "k"
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {n: sha256(folder / n) for n in ("first.nc", "first.png")}
    assert manifest["files"] == files and manifest["facts"] == {"model_sha256": "ab" * 32}
    if signum == signal.SIGTERM:  # handled: the run is marked failed and the process exits 128 + 15
        assert proc.returncode == 143, stderr
        assert manifest["status"] == "failed" and "SIGTERM" in manifest["error"]
        assert "SIGTERM" in (folder / "log.txt").read_text()
    else:  # nothing can run after SIGKILL: the last update says running
        assert proc.returncode == -signal.SIGKILL and manifest["status"] == "running"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files

    config = {"n": 3, "resume": "k"}  # an experiment script's Config.resume names the run being resumed
    with pl.ExperimentRun("exp", root=tmp_path, config=config, seed=5, run_id="k", resume=True) as run:
        kept = run.load_dataset("first")
        run.record(model_sha256="ab" * 32)
    np.testing.assert_array_equal(kept.x.values, [0.0, 1.0, 2.0])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["files"] == files  # the figure is kept too
    assert manifest["config"] == json.loads((folder / "config.json").read_text()) == {"n": 3, "resume": ""}
    assert [a["command"] for a in manifest["earlier_attempts"]] == [["child"]]


def test_sigterm_in_an_open_run_raises_and_the_handler_is_restored(tmp_path):
    def previous(signum, frame):
        raise AssertionError("not while the run is open")

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(experiment_module.RunTerminated) as info:
            with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="t", command=["x"]) as run:
                run.save_json({"a": 1}, "partial")
                signal.raise_signal(signal.SIGTERM)
                raise AssertionError("SIGTERM did not stop the run")
        assert isinstance(info.value, SystemExit) and info.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "SIGTERM" in manifest["error"]
    assert manifest["files"] == {"partial.json": sha256(run.path / "partial.json")}


def test_a_run_in_another_thread_leaves_signals_alone(tmp_path):
    before, errors = signal.getsignal(signal.SIGTERM), []

    def work():
        try:
            with pl.ExperimentRun("exp", root=tmp_path, config={}, seed=0, run_id="th", command=["x"]) as run:
                run.record(a=1)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before
    assert json.loads((tmp_path / "exp" / "th" / "manifest.json").read_text())["status"] == "completed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptConfig:  # shaped like the experiment scripts' Config
    n_prompts: int = 8
    metric: str = "logit_diff"
    resume: str = ""


def failed_first_attempt(root: Path, config: ScriptConfig, seed: int = 0) -> Path:
    with pytest.raises(RuntimeError, match="interrupted"):
        with pl.ExperimentRun("exp", root=root, config=config, seed=seed, run_id="r", command=["x"]) as run:
            run.save_dataset(small_result(), "sweep")
            run.record(model_id="m", model_sha256="ab" * 32, dataset_sha256="cd" * 32, clean_mean=1.5)
            raise RuntimeError("interrupted")
    return run.path


def test_resume_refuses_another_config_or_seed_and_changes_nothing(tmp_path):
    folder = failed_first_attempt(tmp_path, ScriptConfig())
    before = folder_bytes(folder)
    with pytest.raises(experiment_module.ResumeMismatchError) as info:
        with pl.ExperimentRun("exp", root=tmp_path, config=ScriptConfig(n_prompts=16, resume="r"), seed=1,
                              run_id="r", resume=True):
            raise AssertionError("refused runs do not open")
    error = info.value
    assert isinstance(error, ValueError)
    assert error.differences == {"config.n_prompts": (8, 16), "seed": (0, 1)}  # not config.resume
    message = str(error)
    assert "config.n_prompts: 8 before, 16 now" in message and "seed: 0 before, 1 now" in message
    assert "config.resume" not in message and "start a new run" in message
    assert folder_bytes(folder) == before
    with pytest.raises(experiment_module.ResumeMismatchError, match="config.resume: '' before, 'r' now"):
        with pl.ExperimentRun("exp", root=tmp_path, config=ScriptConfig(resume="r"), seed=0, run_id="r",
                              resume=True, ignore_on_resume=()):
            pass
    with pytest.raises(experiment_module.ResumeMismatchError, match=r"config.metric: 'logit_diff' before, <absent>"):
        with pl.ExperimentRun("exp", root=tmp_path, config={"n_prompts": 8, "resume": ""}, seed=0, run_id="r",
                              resume=True):
            pass
    assert folder_bytes(folder) == before
    with pl.ExperimentRun("exp", root=tmp_path, config=ScriptConfig(resume="r"), seed=0, run_id="r",
                          resume=True) as run:
        assert run.load_dataset("sweep") is not None
    assert json.loads((folder / "manifest.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("fact", ["model_sha256", "dataset_sha256", "model_id"])
def test_resume_refuses_another_model_or_dataset_when_recorded(tmp_path, fact):
    folder = failed_first_attempt(tmp_path, ScriptConfig())
    before = folder_bytes(folder)
    old = json.loads(before["manifest.json"])["facts"][fact]
    with pytest.raises(experiment_module.ResumeMismatchError) as info:
        with pl.ExperimentRun("exp", root=tmp_path, config=ScriptConfig(resume="r"), seed=0, run_id="r",
                              resume=True) as run:
            run.record(clean_mean=1.5)  # facts that are results may be recorded again
            run.record(**{fact: "other"})
    assert info.value.differences == {fact: (old, "other")}
    assert f"{fact}: {old!r} before, 'other' now" in str(info.value)
    after = folder_bytes(folder)
    assert after.pop("log.txt").startswith(before.pop("log.txt"))  # the log only grows
    assert after == before  # the manifest is the earlier attempt's again
    with pl.ExperimentRun("exp", root=tmp_path, config=ScriptConfig(resume="r"), seed=0, run_id="r",
                          resume=True) as run:
        run.record(model_id="m", model_sha256="ab" * 32, dataset_sha256="cd" * 32, clean_mean=1.75)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["facts"]["clean_mean"] == 1.75


def test_resume_keeps_the_earlier_attempts_files_and_facts(tmp_path):
    fig, ax = plt.subplots(figsize=(1, 1))
    with pl.ExperimentRun("exp", root=tmp_path, config={"n": 1}, seed=0, run_id="f", command=["x"]) as run:
        run.save_dataset(small_result(), "sweep")
        run.save_figure(fig, "sweep")
        run.record(clean_mean=1.5)
    config_text = (run.path / "config.json").read_text()
    with pl.ExperimentRun("exp", root=tmp_path, config={"n": 1}, seed=0, run_id="f", resume=True) as run:
        assert run.load_dataset("sweep") is not None  # the figure is not drawn again
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["files"] == {n: sha256(run.path / n) for n in ("sweep.nc", "sweep.png")}
    assert manifest["facts"] == {"clean_mean": 1.5} and (run.path / "config.json").read_text() == config_text
    assert [a["status"] for a in manifest["earlier_attempts"]] == ["completed"]


def test_resume_of_a_folder_that_has_only_its_config(tmp_path):
    """A run killed before it wrote any manifest (as patchlab did before manifests were written
    at the start): its config.json is what the resume is checked against."""
    folder = tmp_path / "exp" / "old"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"n": 1, "resume": ""}))
    small_result().to_netcdf(folder / "sweep.nc", engine="netcdf4")
    with pytest.raises(experiment_module.ResumeMismatchError, match="config.n: 1 before, 2 now"):
        with pl.ExperimentRun("exp", root=tmp_path, config={"n": 2, "resume": "old"}, seed=0, run_id="old",
                              resume=True):
            pass
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "sweep.nc"]
    with pl.ExperimentRun("exp", root=tmp_path, config={"n": 1, "resume": "old"}, seed=0, run_id="old",
                          resume=True) as run:
        assert run.load_dataset("sweep") is not None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["files"] == {"sweep.nc": sha256(folder / "sweep.nc")}


def test_step_computes_once_and_a_resumed_run_keeps_it(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return xr.Dataset({"x": ("i", np.arange(3.0))})

    with pl.ExperimentRun("steps", root=tmp_path, config={"a": 1}, seed=0, run_id="r") as run:
        first = run.step("result", compute)
        run.save_jsonl([{"reply": "I cannot"}, {"reply": "Sure"}], "generations")
        assert run.load_jsonl("generations") is None  # not resuming: nothing kept
    with pl.ExperimentRun("steps", root=tmp_path, config={"a": 1}, seed=0, run_id="r", resume=True) as run:
        again = run.step("result", compute)
        kept = run.load_jsonl("generations")
    assert len(calls) == 1 and again.x.values.tolist() == first.x.values.tolist() == [0.0, 1.0, 2.0]
    assert kept == [{"reply": "I cannot"}, {"reply": "Sure"}]
    manifest = json.loads((tmp_path / "steps" / "r" / "manifest.json").read_text())
    assert {"result.nc", "generations.jsonl"} <= {f["path"] if isinstance(f, dict) else f for f in manifest["files"]}
