"""Files: atomic writes (nothing half-written is ever left under a final name) and the model cache root."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "file_sha256", "cache_root", "remove_aside"]


class atomic_path:
    """Context manager yielding a temporary path beside `path` that replaces `path` on success.

    On an exception the temporary file is removed and `path` is left as it was.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.chmod(self.tmp, 0o644)
                os.replace(self.tmp, self.path)
            except BaseException:  # e.g. disk full, permissions: leave no temporary file behind
                self.tmp.unlink(missing_ok=True)
                raise
        else:
            self.tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (temporary file, then ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where patchlab caches models: `cache_dir`, else ``$PATCHLAB_CACHE``, else ``~/.cache/patchlab``."""
    if cache_dir is None:
        cache_dir = os.environ.get("PATCHLAB_CACHE") or Path.home() / ".cache" / "patchlab"
    return Path(cache_dir).expanduser()


def remove_aside(folder: Path) -> None:
    """Rename ``folder`` out of the way (atomically) and delete it."""
    aside = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
