"""Provenance: where a result came from (code, libraries, machine, time).

Everything here is read-only and never raises on a missing tool: an unknown
fact is reported as ``"unknown"`` rather than stopping an experiment. The one
exception is `provenance_attrs`, which raises `TypeError` for a value that
cannot be stored as a netCDF attribute, because a silently mangled attribute
is worse than a loud error.

`provenance_attrs` builds the flat attribute dict that every patchlab result
Dataset carries (STYLE.md principle 5); its values are ``str``, ``int`` or
``float`` only, so they survive ``Dataset.to_netcdf`` / ``xr.open_dataset``
unchanged.
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._io import file_sha256

__all__ = ["versions", "git_commit", "machine", "now_iso", "file_sha256",
           "provenance_attrs", "attr_value"]

_PACKAGES = ("patchlab", "nnsight", "torch", "transformers", "xarray")
_GIT_TIMEOUT_S = 5.0


def _patchlab_source_version() -> str:
    """Version from the pyproject.toml next to the package, for an uninstalled checkout."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    # A regex rather than tomllib: requires-python is >= 3.10, tomllib is 3.11+.
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    match = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return match.group(1) if match else "0+unknown"


def versions() -> dict[str, str]:
    """Versions of patchlab, its main dependencies and Python.

    Returns:
        ``{"patchlab", "nnsight", "torch", "transformers", "xarray", "python"}``
        mapped to version strings. A package that is not installed reads
        ``"unknown"``; patchlab run from a source checkout (not installed) reads
        the version in its ``pyproject.toml``, or ``"0+unknown"``.
    """
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = _patchlab_source_version() if name == "patchlab" else "unknown"
    out["python"] = platform.python_version()
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    """Stdout of a read-only git command, or None on any failure."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        proc = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=_GIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_commit(path: str | Path | None = None) -> str:
    """HEAD commit of the git repository containing ``path``.

    Args:
        path: a file or directory inside the repository; default the current
            working directory.

    Returns:
        The 40-hex commit id, with ``"-dirty"`` appended when tracked files have
        uncommitted changes (untracked files do not count); ``"unknown"`` when
        ``path`` is not in a git repository, has no commits, git is missing or
        does not answer within a few seconds. Never raises. Only read-only git
        commands are run, without optional locks (the index is not refreshed).
    """
    try:
        where = Path.cwd() if path is None else Path(path)
        if not where.is_dir():
            where = where.parent
        if not where.is_dir():
            return "unknown"
    except OSError:
        return "unknown"
    head = _git(["rev-parse", "--verify", "HEAD"], where)
    if head is None or not re.fullmatch(r"[0-9a-f]{40,64}", head.strip()):
        return "unknown"
    status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    dirty = status is None or status.strip() != ""  # status unknown: do not claim clean
    return head.strip() + ("-dirty" if dirty else "")


def _processor() -> str:
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64", "arm64", "i386"):
        return name
    try:  # Linux: platform.processor() is often empty or just the architecture
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine() or "unknown"


def _total_ram() -> str:
    try:
        n = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return "unknown"
    return f"{n / 2**30:.1f} GiB"


def machine() -> dict[str, str]:
    """Facts about the machine this process runs on (all values strings).

    Keys: ``hostname``, ``platform``, ``processor``, ``cpu_count``,
    ``torch_threads``, ``ram`` (total physical memory, e.g. ``"125.7 GiB"``, or
    ``"unknown"`` where the OS does not say cheaply), ``device`` (``"cpu"``, or
    the name of CUDA device 0 when CUDA is available).
    """
    try:
        import torch
        threads = str(torch.get_num_threads())
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # torch missing or a broken CUDA setup: still describe the machine
        threads, device = "unknown", "unknown"
    return {
        "hostname": socket.gethostname() or platform.node() or "unknown",
        "platform": platform.platform(),
        "processor": _processor(),
        "cpu_count": str(os.cpu_count() or "unknown"),
        "torch_threads": threads,
        "ram": _total_ram(),
        "device": device,
    }


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second: ``"2026-11-21T10:15:30Z"``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def attr_value(value: Any) -> str | int | float:
    """Convert one value to a netCDF-safe attribute value (str, int or float).

    ``None`` becomes ``""``, ``bool`` becomes 0/1, an `enum.Enum` its value,
    a `Path` its string, numpy scalars the matching Python number.

    Raises:
        TypeError: for anything else (lists, dicts, arrays, objects): encode
            those yourself, e.g. as JSON text, so the encoding is deliberate.
    """
    if value is None:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return int(value)
    for kind in (str, int, float):  # also plain-ifies subclasses such as numpy.float64
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return attr_value(value.item())
    raise TypeError(f"cannot store {type(value).__name__} {value!r} as a netCDF attribute; "
                    "use a str, int or float")


def provenance_attrs(*, model_id: str, model_sha256: str, dataset_sha256: str,
                     seed: int | None, git_path: str | Path | None = None,
                     **extra: Any) -> dict[str, str | int | float]:
    """Flat provenance attributes for a result ``Dataset.attrs``.

    Args:
        model_id: the model's name or path, as loaded.
        model_sha256: hash of the model weights.
        dataset_sha256: hash of the prompt dataset.
        seed: the random seed of the run (None is stored as ``""``).
        git_path: where to look for the git commit (default: the current
            working directory).
        **extra: more attributes (e.g. ``metric="logit_diff"``, ``units="nats"``);
            they are added last, so they may override a computed key such as
            ``created``.

    Returns:
        A dict with keys ``model_id``, ``model_sha256``, ``dataset_sha256``,
        ``seed``, ``patchlab_version``, ``nnsight_version``, ``torch_version``,
        ``transformers_version``, ``xarray_version``, ``python_version``,
        ``git_commit``, ``created`` and the extra keys; every value is a str,
        int or float (see `attr_value`).

    Raises:
        TypeError: a value that is not netCDF-safe (see `attr_value`).
    """
    attrs: dict[str, Any] = {"model_id": model_id, "model_sha256": model_sha256,
                             "dataset_sha256": dataset_sha256, "seed": seed}
    attrs.update({f"{name}_version": v for name, v in versions().items()})
    attrs["git_commit"] = git_commit(git_path)
    attrs["created"] = now_iso()
    attrs.update(extra)
    return {str(k): attr_value(v) for k, v in attrs.items()}
