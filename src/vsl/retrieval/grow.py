"""A gallery that shrinks without rebuilding: generations, tombstones and the writer's lock.

The manifest of an index folder carries ``generation`` (0 for a fresh build; an older manifest
without it reads as 0). ``vsl index --remove IDS_FILE`` writes a new generation that lists the
removed image ids in ``removed-g{N}.npy`` (int64, sorted; data written by earlier generations is
never modified) and replaces the manifest atomically, last: a reader (:meth:`Index.load`) reads
the manifest once and opens only the files it lists, so it sees one consistent generation, and a
crash before the rename leaves the previous generation as it was. Removed images never come out of
a search (FAISS search-time selectors, :func:`vsl.retrieval.faiss_index.search`); the split's
captions of a removed image are hidden from image -> text search too. Writers take
``IDX/.lock`` (``fcntl.flock``, non-blocking): a second writer is refused in one line.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from ..errors import ConfigError, DataError
from ..fileio import atomic_write
from .store import read_manifest, write_manifest

PathLike = Union[str, os.PathLike]
LOCK = ".lock"
#: Ids named in a refusal before "... (N in all)".
SHOWN_IDS = 5


class IndexBusy(ConfigError):
    """Another writer holds the index folder's lock."""


def generation(manifest) -> int:
    """The manifest's generation (0 for an index written before generations existed)."""
    return int(manifest.get("generation", 0))


def removed_images(path: Path, manifest) -> np.ndarray:
    """Sorted int64 ids of the removed images of this generation (empty when none)."""
    name = manifest.get("removed_images")
    if not name:
        return np.zeros(0, dtype=np.int64)
    ids = np.load(path / name)
    if ids.dtype != np.int64 or ids.ndim != 1:
        raise DataError(f"{path / name}: expected a 1-d int64 array of removed image ids")
    return ids


@contextmanager
def writer_lock(path: PathLike) -> Iterator[None]:
    """Hold ``path/.lock`` exclusively for one writer; a ConfigError (one line) when another holds it."""
    path = Path(path)
    lock = path / LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise IndexBusy(f"another vsl index is writing {path} (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)                         # closing releases the lock


#: Files of an index folder that writers own (others, e.g. ``photos/`` or a user's notes, are never touched).
OWNED = ("images.*", "captions.*", "removed-g*.npy", ".*.tmp")


def sweep(path: Path, *keep: Sequence[str]) -> None:
    """Delete the index files of ``path`` listed by none of ``keep`` (the new manifest's files and the
    previous one's: a reader that opened the previous generation still finds every file it lists),
    except those of a segment an interrupted ``--add`` is still writing (it resumes them); temporary
    files of writes a crash interrupted go too (the caller holds the writer's lock)."""
    kept = {name for names in keep for name in names}
    pending = {p.name[len("progress-segment"):].split("-")[0] for p in path.glob("progress-segment.*.json")}
    for pattern in OWNED:
        for file in path.glob(pattern):
            if file.name in kept or file.name == LOCK or not file.is_file():
                continue
            if any(f"{suffix}." in file.name for suffix in pending):
                continue
            file.unlink(missing_ok=True)


def read_ids(ids_file: PathLike) -> np.ndarray:
    """Image ids of ``ids_file`` (one integer a line; blank lines ignored) as int64."""
    ids_file = Path(ids_file)
    try:
        lines = ids_file.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{ids_file}: cannot read the ids file ({exc})") from None
    bad = [s for s in lines if not s.lstrip("-").isdigit()]
    if bad:
        raise ConfigError(f"{ids_file}: not an image id {bad[0]!r} (expected one integer a line)")
    if not lines:
        raise ConfigError(f"{ids_file}: no image ids (expected one integer a line)")
    return np.array([int(s) for s in lines], dtype=np.int64)


def _listed(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN_IDS else "")


def remove_images(path: PathLike, ids: Sequence[int]) -> int:
    """Hide the images ``ids`` of the index ``path`` in a new generation; returns that generation.

    Unknown or already removed ids: a ConfigError listing them, nothing changed.
    """
    path = Path(path)
    read_manifest(path)
    with writer_lock(path):
        manifest = read_manifest(path)                 # re-read under the lock: the newest generation
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        n = int(manifest["num_images"])
        gone = removed_images(path, manifest)
        unknown = ids[(ids < 0) | (ids >= n)]
        if len(unknown):
            raise ConfigError(f"{path}: unknown image ids {_listed(unknown.tolist())} (the index has ids 0..{n - 1}); "
                              "nothing removed")
        again = ids[np.isin(ids, gone)]
        if len(again):
            raise ConfigError(f"{path}: image ids already removed: {_listed(again.tolist())}; nothing removed")
        new = generation(manifest) + 1
        name = f"removed-g{new}.npy"
        merged = np.union1d(gone, ids).astype(np.int64)
        atomic_write(path / name, lambda fh: np.save(fh, merged))
        old = manifest.get("removed_images")
        files = {k: v for k, v in manifest.get("files", {}).items() if k != old}
        files[name] = (path / name).stat().st_size
        write_manifest(path, {**manifest, "generation": new, "removed_images": name, "files": files,
                              "num_removed": int(len(merged)),
                              "history": manifest.get("history", []) + [{"generation": new,
                                                                         "removed": int(len(ids))}]})
        sweep(path, files, manifest.get("files", {}))
    return new
