"""Provenance facts checked against independent sources (files, the OS, a fresh git repo)."""

from __future__ import annotations

import enum
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from patchlab import provenance
from patchlab.provenance import (attr_value, file_sha256, git_commit, machine, now_iso,
                                 provenance_attrs, versions)

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True, timeout=30)


def head_from_files(repo: Path) -> str:
    """HEAD read from .git without git: ``ref: refs/heads/<branch>`` -> that ref's file."""
    head = (repo / ".git" / "HEAD").read_text().strip()
    assert head.startswith("ref: ")
    return (repo / ".git" / head[5:]).read_text().strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh git repo with one commit of a tracked file ``a.txt``."""
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "--no-gpg-sign", "-m", "first")
    return tmp_path


def test_versions_match_the_imported_packages():
    v = versions()
    assert set(v) == {"patchlab", "nnsight", "torch", "transformers", "xarray", "python"}
    assert v["torch"] == torch.__version__ and v["xarray"] == xr.__version__
    assert v["python"] == platform.python_version()
    assert all(isinstance(x, str) and x for x in v.values())


def test_patchlab_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    real = importlib.metadata.version

    def fake(name):
        if name in ("patchlab", "nnsight"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(provenance.importlib.metadata, "version", fake)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = Path(provenance.__file__).resolve().parent.parent / "pyproject.toml"
    expected = tomllib.loads(pyproject.read_text())["project"]["version"]
    v = versions()
    assert v["patchlab"] == expected and v["nnsight"] == "unknown"


def test_git_commit_is_the_real_head_and_notices_edits(repo: Path):
    head = head_from_files(repo)
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert git_commit(repo) == head
    assert git_commit(repo / "a.txt") == head  # a file inside the repo
    (repo / "sub").mkdir()
    assert git_commit(repo / "sub") == head
    (repo / "new.txt").write_text("untracked\n")  # untracked files do not make it dirty
    assert git_commit(repo) == head
    (repo / "a.txt").write_text("two\n")
    assert git_commit(repo) == head + "-dirty"
    git(repo, "commit", "-q", "--no-gpg-sign", "-am", "second")
    assert git_commit(repo) == head_from_files(repo) != head


def test_git_commit_defaults_to_the_working_directory(repo: Path, monkeypatch):
    monkeypatch.chdir(repo)
    assert git_commit() == head_from_files(repo)


def test_git_commit_says_unknown_instead_of_raising(tmp_path: Path, monkeypatch):
    assert git_commit(tmp_path) == "unknown"  # not a repo
    assert git_commit(tmp_path / "missing" / "deeper") == "unknown"
    git(tmp_path, "init", "-q")
    assert git_commit(tmp_path) == "unknown"  # a repo without commits
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git executable at all
    assert git_commit(tmp_path) == "unknown"


def test_machine_describes_this_process():
    m = machine()
    assert set(m) == {"hostname", "platform", "processor", "cpu_count", "torch_threads", "ram", "device"}
    assert all(isinstance(v, str) and v for v in m.values())
    assert m["cpu_count"] == str(os.cpu_count())
    assert m["torch_threads"] == str(torch.get_num_threads())
    assert m["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


def test_now_iso_is_utc_now():
    stamp = now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - parsed) < timedelta(seconds=5)


def test_file_sha256_matches_hashlib(tmp_path: Path):
    data = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin", chunk_bytes=777) == hashlib.sha256(data).hexdigest()


class Colour(enum.Enum):
    RED = "red"


@pytest.mark.parametrize("value, expected", [
    (None, ""), (True, 1), (False, 0), ("x", "x"), (3, 3), (0.5, 0.5),
    (np.float32(0.5), 0.5), (np.int64(7), 7), (Path("a/b"), "a/b"), (Colour.RED, "red"),
    (torch.tensor(2.5), 2.5),
])
def test_attr_value_gives_plain_netcdf_types(value, expected):
    out = attr_value(value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, np.zeros(3), object()])
def test_attr_value_refuses_what_netcdf_cannot_hold(value):
    with pytest.raises(TypeError, match="netCDF attribute"):
        attr_value(value)


def test_provenance_attrs_are_complete_and_flat(repo: Path):
    attrs = provenance_attrs(model_id="tiny", model_sha256="ab" * 32, dataset_sha256="cd" * 32,
                             seed=None, git_path=repo, metric="logit_diff", flag=True, note=None)
    for key in ("model_id", "model_sha256", "dataset_sha256", "seed", "patchlab_version",
                "nnsight_version", "torch_version", "transformers_version", "xarray_version",
                "git_commit", "created", "metric", "flag", "note"):
        assert key in attrs
    assert all(type(v) in (str, int, float) for v in attrs.values())
    assert attrs["seed"] == "" and attrs["flag"] == 1 and attrs["note"] == ""
    assert attrs["git_commit"] == head_from_files(repo)
    assert attrs["torch_version"] == torch.__version__
    with pytest.raises(TypeError):
        provenance_attrs(model_id="m", model_sha256="", dataset_sha256="", seed=0, bad={"a": 1})


def test_provenance_attrs_survive_a_netcdf_round_trip(tmp_path: Path, repo: Path):
    attrs = provenance_attrs(model_id="tiny", model_sha256="ab" * 32, dataset_sha256="cd" * 32,
                             seed=7, git_path=repo, units="nats", direction="denoising",
                             ratio=np.float64(0.25), strict=False)
    ds = xr.Dataset({"score": (("layer", "pos"), np.arange(6.0).reshape(2, 3))},
                    coords={"layer": [0, 1], "pos": [0, 1, 2],
                            "token": ("pos", np.asarray(["a", " b", "\n"], dtype=str)),
                            "pos_name": ("pos", np.asarray(["", "IO", ""], dtype=str))},
                    attrs=attrs)
    path = tmp_path / "r.nc"
    ds.to_netcdf(path, engine="netcdf4")
    with xr.open_dataset(path, engine="netcdf4") as back:
        loaded = back.load()
    xr.testing.assert_identical(loaded, ds)
    assert loaded.attrs["seed"] == 7 and loaded.attrs["strict"] == 0
    assert loaded.attrs["git_commit"] == head_from_files(repo)
