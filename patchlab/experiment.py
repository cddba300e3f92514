"""Reproducible experiment folders: ``<root>/<experiment>/<run-id>/``.

An `ExperimentRun` creates the folder, writes the resolved config, logs to
``log.txt``, saves results (netCDF), figures (PNG, SVG, PDF), prompts (JSONL)
and JSON atomically (nothing half-written is left under a final name), and
keeps ``manifest.json``: command, config, seed, versions, git commit, machine,
recorded facts (model and dataset hashes, ...), and every file written with
its sha256.

The manifest's life cycle: written when the run opens (``"status": "running"``),
rewritten atomically after every file written and every `ExperimentRun.record`
(so a process killed even by SIGKILL leaves the list of what it finished), and
written last with ``"completed"`` or ``"failed"`` and the error. While a run is
open in the main thread, SIGTERM raises `RunTerminated`, as Ctrl-C raises
`KeyboardInterrupt`: the run is marked failed, what it saved is kept, and the
process exits with status 143 (128 + SIGTERM).

Resuming (``resume=True``) reopens an interrupted run's folder and keeps its
config, facts and files. It must be the same run: the configuration (less
``ignore_on_resume``), the seed and, as they are recorded, the facts named in
`RESUME_FACTS` must equal the earlier attempt's, else `ResumeMismatchError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._io import atomic_path, atomic_write_text
from ._io import file_sha256
from .provenance import git_commit, machine, now_iso, versions

__all__ = ["ExperimentRun", "ResumeMismatchError", "RunTerminated", "RESUME_FACTS", "config_from_args"]

log = logging.getLogger("patchlab")

RESUME_FACTS = ("model_id", "model_sha256", "dataset_sha256")
"""Facts naming a run's inputs: a resumed run may not record other values than its earlier attempt did."""

_SECRET = "***"
"""How a secret dataclass field (``field(metadata={"secret": True})``, e.g. `patchlab.Remote.api_key`)
is written to config.json and the manifest."""

_ATTEMPT_KEYS = ("command", "status", "error", "started", "finished", "git_commit", "versions", "machine")


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


class ResumeMismatchError(ValueError):
    """A resumed run differs from its earlier attempt: configuration, seed, dataset or model.

    Attributes:
        folder: the run folder.
        differences: ``{key: (earlier value, this attempt's value)}``; configuration keys
            read ``config.<name>`` (``config.<name>.<sub>`` when nested), facts their name.
    """

    def __init__(self, folder: str | os.PathLike, differences: Mapping[str, tuple[Any, Any]]) -> None:
        self.folder, self.differences = Path(folder), dict(differences)
        lines = "".join(f"\n  {key}: {old!r} before, {new!r} now" for key, (old, new) in self.differences.items())
        super().__init__(f"cannot resume {self.folder}: this attempt differs from the earlier one in{lines}\n"
                         "Resume with the same configuration, seed, dataset and model, or start a new run "
                         "(without --resume or resume=True).")


class RunTerminated(SystemExit):
    """The process received SIGTERM while a run was open.

    A `SystemExit`, not an `Exception`, so ``except Exception`` does not swallow it; uncaught,
    it ends the process with status ``128 + signum`` (143), the shell's code for SIGTERM.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"the process received {signal.Signals(self.signum).name}"


class ExperimentRun:
    """One run of an experiment, as a context manager.

    Args:
        name: experiment name, the folder under `root`.
        root: results root (default ``results``).
        config: the resolved configuration: a dataclass instance or a mapping;
            written to ``config.json`` (secret dataclass fields as ``"***"``).
        seed: the run's seed, recorded in the manifest.
        run_id: folder name; default a UTC timestamp such as ``20261121T101530Z``
            (with a ``-2``, ``-3``... suffix if taken).
        command: the command line recorded in the manifest (default ``sys.argv``).
        resume: reopen the existing folder `run_id` of an interrupted run: results
            already saved there are returned by `load_dataset` instead of recomputed;
            its config.json, facts and files are kept. The configuration and seed
            are checked on entering, the facts of `RESUME_FACTS` when recorded.
        ignore_on_resume: top-level config keys left out of the resume check. The
            default ``("resume",)`` is the experiment scripts' ``Config.resume``, the
            id of the run being resumed, which necessarily differs from the first
            attempt's. Name only keys that cannot change results. An argument rather
            than a marker on config fields, so that any mapping or dataclass works and
            the rule is visible where the run is opened.

    Raises:
        ValueError: `resume` without a `run_id`.
        FileExistsError: an explicit `run_id` whose folder already exists (without `resume`).
        FileNotFoundError: `resume` with no such run folder.
        ResumeMismatchError: on entering, `resume` with another configuration or seed
            than the earlier attempt's; nothing in the folder is changed.
    """

    def __init__(self, name: str, *, root: str | os.PathLike = "results", config: Any, seed: int,
                 run_id: str | None = None, command: Sequence[str] | None = None, resume: bool = False,
                 ignore_on_resume: Sequence[str] = ("resume",)) -> None:
        if resume and not run_id:
            raise ValueError("resume=True needs the run_id of the run to resume")
        self.name, self.seed = name, seed
        self.config = _plain(config)
        self.command = list(command) if command is not None else [sys.executable, *sys.argv]
        self.root = Path(root)
        self._run_id, self.resume = run_id, resume
        self.ignore_on_resume = frozenset(ignore_on_resume)
        self.facts: dict[str, Any] = {}
        self.files: list[Path] = []
        self.path: Path | None = None
        self._sha256: dict[str, str] = {}  # file name -> sha256, as written
        self._recorded: set[str] = set()  # facts recorded by this attempt
        self._earlier: dict[str, Any] = {}  # the earlier attempt's manifest (resuming)
        self._earlier_text: str | None = None
        self._refusal: ResumeMismatchError | None = None
        self._open = False
        self._guard = _SigtermGuard()
        self._handler: logging.Handler | None = None

    # ---- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "ExperimentRun":
        self.path = self._make_folder()
        if self.resume:
            self._reopen()
        self._start, self._started = time.perf_counter(), now_iso()
        self._provenance = {"versions": versions(), "git_commit": git_commit(Path(__file__).parent),
                            "machine": machine()}
        if "config" not in self._earlier:
            atomic_write_text(self.path / "config.json", json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        self._open = True
        self._write_manifest("running")
        self._open_log()
        self._guard.install()
        log.info("run %s/%s %s: %s", self.name, self.path.name, "started (resuming)" if self.resume else "started",
                 " ".join(self.command))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._guard.hold()  # a SIGTERM from here on waits until the manifest is written
        try:
            if exc is not None and exc is self._refusal:
                log.error("resume refused, the folder keeps the earlier attempt's manifest: %s", exc)
                self._put_back_earlier_manifest()
            elif exc_type is None:
                log.info("run completed in %.1f s", time.perf_counter() - self._start)
                self._write_manifest("completed")
            else:
                log.error("run failed: %s: %s", exc_type.__name__, exc)
                self._write_manifest("failed", f"{exc_type.__name__}: {exc}")
        finally:
            self._open = False
            self._close_log()
            self._guard.restore()

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
        self._track(path)
        return loaded

    def step(self, name: str, compute):
        """The Dataset ``<name>.nc``: kept from the earlier attempt when resuming, else
        ``compute()``, saved (one resumable step of an experiment)."""
        ds = self.load_dataset(name)
        if ds is None:
            log.info("computing %s", name)
            ds = compute()
            self.save_dataset(ds, name)
        return ds

    def save_prompts(self, dataset, name: str = "prompts") -> Path:
        """Write a `PromptPairDataset` to ``<name>.jsonl``, atomically; the first one saved
        gives the fact ``dataset_sha256``.

        Raises:
            ResumeMismatchError: resuming, with saved prompts ``<name>.jsonl`` or a recorded
                ``dataset_sha256`` other than `dataset`'s; nothing is written.
        """
        path, sha = self._out(f"{name}.jsonl"), dataset.sha256()
        if self.resume and path.exists() and (old := file_sha256(path)) != sha:
            self._refuse({f"{path.name} sha256": (old, sha)})
        if "dataset_sha256" not in self._recorded:
            self.record(dataset_sha256=sha)
        dataset.to_jsonl(path)
        return self._written(path)

    def save_json(self, obj: Any, name: str) -> Path:
        """Write a JSON-able object to ``<name>.json``, atomically (e.g. ``circuit.to_json()``)."""
        path = self._out(f"{name}.json")
        atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")
        return self._written(path)

    def save_jsonl(self, records: Sequence[Any], name: str) -> Path:
        """Write JSON-able records to ``<name>.jsonl``, one per line, atomically (e.g. generations)."""
        path = self._out(f"{name}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))
        return self._written(path)

    def load_jsonl(self, name: str) -> list | None:
        """The records saved as ``<name>.jsonl`` by an earlier attempt of this run (only when
        resuming), else None."""
        path = self._out(f"{name}.jsonl")
        if not (self.resume and path.exists()):
            return None
        self._track(path)
        return [json.loads(line) for line in path.read_text().splitlines()]

    def record(self, **facts: Any) -> None:
        """Add facts to the manifest (model id and hash, baselines, ...); an open run rewrites it.

        Raises:
            ResumeMismatchError: resuming, a fact of `RESUME_FACTS` that the earlier attempt
                recorded with another value; nothing is recorded, and on exit the folder
                gets the earlier attempt's manifest back.
        """
        plain = _json_copy({k: _plain(v) for k, v in facts.items()})
        earlier = self._earlier.get("facts", {})
        differ = {k: (earlier[k], plain[k]) for k in RESUME_FACTS
                  if k in plain and earlier.get(k, plain[k]) != plain[k]}
        if differ:
            self._refuse(differ)
        self.facts.update(plain)
        self._recorded.update(plain)
        self._write_manifest("running")

    # ---- resuming ----------------------------------------------------------
    def _reopen(self) -> None:
        """Check this attempt against the folder's earlier one, then keep its facts and files.

        Raises:
            ResumeMismatchError: another configuration (less `ignore_on_resume`) or seed.
        """
        earlier, self._earlier_text = _read_earlier(self.path)
        config = _json_copy(self.config)
        differ = _differences(self._compared(earlier.get("config", config)), self._compared(config), "config")
        if earlier.get("seed", self.seed) != self.seed:
            differ["seed"] = (earlier["seed"], self.seed)
        if differ:
            raise ResumeMismatchError(self.path, differ)
        self._earlier = earlier
        self.facts = dict(earlier.get("facts", {}))
        for name in earlier.get("files", {}):
            if (self.path / name).is_file():
                self._add(self.path / name)

    def _compared(self, config: Any) -> Any:
        if not isinstance(config, dict):
            return config
        return {k: v for k, v in config.items() if k not in self.ignore_on_resume}

    def _refuse(self, differences: Mapping[str, tuple[Any, Any]]) -> None:
        self._refusal = ResumeMismatchError(self.path, differences)
        raise self._refusal

    def _put_back_earlier_manifest(self) -> None:
        if self._earlier_text is None:
            (self.path / "manifest.json").unlink(missing_ok=True)
        else:
            atomic_write_text(self.path / "manifest.json", self._earlier_text)

    def _earlier_attempts(self) -> list[dict[str, Any]]:
        if "status" not in self._earlier:  # not resuming, or a folder without a manifest
            return []
        return [*self._earlier.get("earlier_attempts", []),
                {k: self._earlier[k] for k in _ATTEMPT_KEYS if k in self._earlier}]

    # ---- manifest, log, files ----------------------------------------------
    def _write_manifest(self, status: str, error: str = "") -> None:
        if not self._open:
            return
        manifest = {
            "experiment": self.name, "run_id": self.path.name, "status": status, "error": error,
            "command": self.command, "config": self._earlier.get("config", self.config), "seed": self.seed,
            **self._provenance, "pid": os.getpid(),
            "started": self._started, "updated": now_iso(), "finished": None if status == "running" else now_iso(),
            "wall_seconds": round(time.perf_counter() - self._start, 3),
            "facts": self.facts, "files": dict(self._sha256), "earlier_attempts": self._earlier_attempts(),
        }
        atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")

    def _open_log(self) -> None:
        self._handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.setLevel(logging.INFO)
        self._previous_level = log.level
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        log.addHandler(self._handler)

    def _close_log(self) -> None:
        log.removeHandler(self._handler)
        self._handler.close()
        log.setLevel(self._previous_level)

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

    def _add(self, path: Path) -> None:
        if path not in self.files:
            self.files.append(path)
        self._sha256[path.name] = file_sha256(path)

    def _track(self, path: Path) -> None:
        self._add(path)
        self._write_manifest("running")

    def _written(self, path: Path) -> Path:
        self._track(path)
        log.info("wrote %s", path.name)
        return path


class _SigtermGuard:
    """While a run is open, SIGTERM raises `RunTerminated`. Only in the main thread: Python
    runs signal handlers there, and only there can they be installed."""

    def __init__(self) -> None:
        self._installed, self._pending, self._previous = False, False, None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
            self._installed = True

    def hold(self) -> None:
        """From now on a SIGTERM is remembered, not raised (the run is writing its last manifest)."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._remember)

    def restore(self) -> None:
        """Put the previous handler back, and give it a SIGTERM that came while held."""
        if not self._installed:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
        self._installed = False
        if self._pending:
            signal.raise_signal(signal.SIGTERM)

    @staticmethod
    def _raise(signum, frame) -> None:
        raise RunTerminated(signum)

    def _remember(self, signum, frame) -> None:
        self._pending = True


def _read_earlier(folder: Path) -> tuple[dict[str, Any], str | None]:
    """The earlier attempt's manifest and its text; for a folder without one (written by a
    patchlab that wrote manifests only at the end) ``{"config": ...}`` from its config.json."""
    manifest, config = folder / "manifest.json", folder / "config.json"
    if manifest.is_file():
        text = manifest.read_text(encoding="utf-8")
        return json.loads(text), text
    if config.is_file():
        return {"config": json.loads(config.read_text(encoding="utf-8"))}, None
    return {}, None


def _differences(old: Any, new: Any, key: str) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every value that differs, recursing into mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return {} if old == new else {key: (old, new)}
    out: dict[str, tuple[Any, Any]] = {}
    for name in sorted(set(old) | set(new)):
        out.update(_differences(old.get(name, _ABSENT), new.get(name, _ABSENT), f"{key}.{name}"))
    return out


def config_from_args(config_cls, argv: Sequence[str] | None = None, *, description: str = ""):
    """Build a config dataclass from command-line flags: one ``--field-name`` per field,
    typed and defaulted from the class (for thin experiment scripts)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(config_cls):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"(default: {field.default})")
    return config_cls(**vars(parser.parse_args(argv)))


def _json_copy(value: Any) -> Any:
    """`value` as it reads back from JSON (what an earlier attempt's manifest holds)."""
    return json.loads(json.dumps(value, default=str))


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses to dicts (secret fields as ``"***"``), paths to str, mappings
    and sequences recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_field(f, getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _plain_field(field: dataclasses.Field, value: Any) -> Any:
    return _SECRET if field.metadata.get("secret") and value is not None else _plain(value)
