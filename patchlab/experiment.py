"""Reproducible experiment folders: ``<root>/<experiment>/<run-id>/``.

An `ExperimentRun` creates the folder, writes the resolved config, logs to
``log.txt``, saves results (netCDF), figures (PNG) and the prompts (JSONL)
atomically, and on exit, also after an error, writes ``manifest.json`` with
everything needed to re-run: command, config, seed, versions, git commit,
machine, recorded facts (model and dataset hashes, ...), and every file written
with its sha256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._io import atomic_path, atomic_write_text
from ._io import file_sha256
from .provenance import git_commit, machine, now_iso, versions

__all__ = ["ExperimentRun", "config_from_args"]

log = logging.getLogger("patchlab")


class ExperimentRun:
    """One run of an experiment, as a context manager.

    Args:
        name: experiment name, the folder under `root`.
        root: results root (default ``results``).
        config: the resolved configuration: a dataclass instance or a mapping;
            written to ``config.json``.
        seed: the run's seed, recorded in the manifest.
        run_id: folder name; default a UTC timestamp such as ``20261121T101530Z``
            (with a ``-2``, ``-3``... suffix if taken).
        command: the command line recorded in the manifest (default ``sys.argv``).
        resume: reopen the existing folder `run_id` of an interrupted run: results
            already saved there are returned by `load_dataset` instead of recomputed.

    Raises:
        FileExistsError: an explicit `run_id` whose folder already exists (without `resume`).
        FileNotFoundError: `resume` with no such run folder.
    """

    def __init__(self, name: str, *, root: str | os.PathLike = "results", config: Any, seed: int,
                 run_id: str | None = None, command: Sequence[str] | None = None, resume: bool = False) -> None:
        if resume and not run_id:
            raise ValueError("resume=True needs the run_id of the run to resume")
        self.name, self.seed = name, seed
        self.config = _plain(config)
        self.command = list(command) if command is not None else [sys.executable, *sys.argv]
        self.root = Path(root)
        self._run_id, self.resume = run_id, resume
        self.facts: dict[str, Any] = {}
        self.files: list[Path] = []
        self.path: Path | None = None
        self._handler: logging.Handler | None = None

    # ---- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "ExperimentRun":
        self.path = self._make_folder()
        self._start, self._started = time.perf_counter(), now_iso()
        self._handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.setLevel(logging.INFO)
        self._previous_level = log.level
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        log.addHandler(self._handler)
        atomic_write_text(self.path / "config.json", json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        log.info("run %s/%s started: %s", self.name, self.path.name, " ".join(self.command))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "completed" if exc_type is None else "failed"
        if exc_type is not None:
            log.error("run failed: %s: %s", exc_type.__name__, exc)
        else:
            log.info("run completed in %.1f s", time.perf_counter() - self._start)
        manifest = {
            "experiment": self.name, "run_id": self.path.name, "status": status,
            "error": "" if exc is None else f"{exc_type.__name__}: {exc}",
            "command": self.command, "config": self.config, "seed": self.seed,
            "versions": versions(), "git_commit": git_commit(Path(__file__).parent), "machine": machine(),
            "started": self._started, "finished": now_iso(),
            "wall_seconds": round(time.perf_counter() - self._start, 3),
            "facts": self.facts,
            "files": {p.name: file_sha256(p) for p in self.files},
        }
        log.removeHandler(self._handler)
        self._handler.close()
        log.setLevel(self._previous_level)
        atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")

    # ---- outputs -----------------------------------------------------------
    def save_dataset(self, ds, name: str) -> Path:
        """Write an ``xarray.Dataset`` to ``<name>.nc`` (netcdf4 engine), atomically."""
        path = self._out(f"{name}.nc")
        with atomic_path(path) as tmp:
            ds.to_netcdf(tmp, engine="netcdf4")
        return self._written(path)

    def save_figure(self, fig, name: str, *, formats: Sequence[str] = ("png",)) -> list[Path]:
        """Write a matplotlib figure to ``<name>.<format>`` for each format (png at 150 dpi,
        svg, pdf), atomically, then close it. SVG/PDF carry no date and fixed ids, so
        their sha256 in the manifest is reproducible.

        Raises:
            ValueError: an unknown format.
        """
        import matplotlib.pyplot as plt

        bad = [f for f in formats if f not in ("png", "svg", "pdf")]
        if bad or not formats:
            raise ValueError(f"figure formats {list(formats)}: use png, svg or pdf")
        paths = []
        try:
            for fmt in formats:
                path = self._out(f"{name}.{fmt}")
                with atomic_path(path) as tmp, plt.rc_context({"svg.hashsalt": "patchlab"}):
                    fig.savefig(tmp, dpi=150, bbox_inches="tight", format=fmt,
                                metadata=None if fmt == "png" else {"Date": None})
                paths.append(self._written(path))
        finally:
            plt.close(fig)
        return paths

    def load_dataset(self, name: str):
        """The ``xarray.Dataset`` saved as ``<name>.nc`` by an earlier attempt of this run
        (only when resuming), else None."""
        import xarray as xr

        path = self._out(f"{name}.nc")
        if not (self.resume and path.exists()):
            return None
        with xr.open_dataset(path, engine="netcdf4") as ds:
            loaded = ds.load()
        log.info("resumed: kept %s from the earlier attempt", path.name)
        self._written(path)
        return loaded

    def save_prompts(self, dataset, name: str = "prompts") -> Path:
        """Write a `PromptPairDataset` to ``<name>.jsonl`` and record its sha256.

        Raises:
            ValueError: resuming a run whose saved prompts differ from `dataset`.
        """
        path = self._out(f"{name}.jsonl")
        if self.resume and path.exists() and file_sha256(path) != dataset.sha256():
            raise ValueError(f"cannot resume {self.path}: its {path.name} differs from this run's dataset; "
                             "resume with the same config, or start a new run")
        dataset.to_jsonl(path)
        self.facts.setdefault("dataset_sha256", dataset.sha256())
        return self._written(path)

    def save_json(self, obj: Any, name: str) -> Path:
        """Write a JSON-able object to ``<name>.json``, atomically (e.g. ``circuit.to_json()``)."""
        path = self._out(f"{name}.json")
        atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")
        return self._written(path)

    def record(self, **facts: Any) -> None:
        """Add facts to the manifest (model id and hash, baselines, ...)."""
        self.facts.update({k: _plain(v) for k, v in facts.items()})

    # ---- helpers -----------------------------------------------------------
    def _make_folder(self) -> Path:
        parent = self.root / self.name
        parent.mkdir(parents=True, exist_ok=True)
        if self._run_id is not None:
            path = parent / self._run_id
            if self.resume:
                if not path.is_dir():
                    raise FileNotFoundError(f"no run {path} to resume")
                return path
            path.mkdir()  # FileExistsError for an explicit id that is taken
            return path
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        for n in range(1, 1000):
            path = parent / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free run folder under {parent} for {stamp}")

    def _out(self, filename: str) -> Path:
        if self.path is None:
            raise RuntimeError("use ExperimentRun as a context manager: `with ExperimentRun(...) as run:`")
        return self.path / filename

    def _written(self, path: Path) -> Path:
        if path not in self.files:
            self.files.append(path)
        log.info("wrote %s", path.name)
        return path


def config_from_args(config_cls, argv: Sequence[str] | None = None, *, description: str = ""):
    """Build a config dataclass from command-line flags: one ``--field-name`` per field,
    typed and defaulted from the class (for thin experiment scripts)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(config_cls):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"(default: {field.default})")
    return config_cls(**vars(parser.parse_args(argv)))


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses to dicts, paths to str, mappings and sequences recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
