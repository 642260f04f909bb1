"""Atomic file writes: a temporary file in the target's folder, then a rename.

A reader (or a run interrupted mid-write) therefore sees either the old file or the complete new
one, never a half-written file. Used for checkpoints, vocabularies, logs, results and datasets.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

from .errors import VSLError

PathLike = Union[str, os.PathLike]


def file_mode() -> int:
    """Permissions of an ordinary new file under the current umask (mkstemp creates 0600 ones)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_sibling(path: PathLike) -> Path:
    """Create an empty temporary file beside ``path`` (same file system, so a rename is atomic)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise VSLError(f"{path}: cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    os.chmod(tmp, file_mode())
    return Path(tmp)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object], fsync: bool = False) -> Path:
    """Call ``write(binary_file)`` on a temporary sibling of ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` (newlines as given) atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def check_writable(path: PathLike, kind: str = "file") -> Path:
    """Fail early, creating nothing, if ``path`` cannot become a ``kind`` ("file" or "folder").

    Long jobs call this before they start, so that a mistyped output path is reported at once
    rather than after hours of training or scoring. Raises :class:`VSLError` naming the path.
    """
    path = Path(path)
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise VSLError(f"{path}: exists and is not a folder (expected an output folder)")
        if kind == "file" and path.is_dir():
            raise VSLError(f"{path}: is a folder (expected a file path to write)")
        target = path if kind == "folder" else path.parent
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise VSLError(f"{path}: cannot be created, {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise VSLError(f"{path}: cannot write in {target} (permission denied)")
    return path


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
