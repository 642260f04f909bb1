"""The files an extraction fills while it runs: preallocated ``.npy`` row files and the block log.

:class:`RowFile` is a ``.npy`` array of fixed shape whose rows are written and read with
``pwrite`` / ``pread`` at their offsets rather than through a memory map: pages written through a
map stay mapped and count towards the process' resident memory (a COCO extraction would reach the
36 GB of its feature file), whereas ``pwrite`` leaves them to the page cache, which the kernel
reclaims. The file is created sparse at its full size, so every process of a torchrun job writes
its own rows into the same file.

:class:`BlockLog` records the finished blocks of one process, one JSON line per block appended and
synced after the block's rows reached the disk, so that an interrupted run trusts exactly the
blocks whose rows were written; a line cut short by the interruption is dropped on reopening.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _header(shape: Tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header (magic, version 1.0, padded dict) of a C-ordered array of ``shape``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


class RowFile:
    """A ``.npy`` file of ``shape`` (rows first) and ``dtype``, its rows written and read in place."""

    def __init__(self, path: PathLike, shape: Tuple[int, ...], dtype, create: bool) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if create:
            header = _header(self.shape, self.dtype)
            with open(self.path, "wb") as fh:
                fh.write(header)
                fh.truncate(len(header) + self.shape[0] * self.row_bytes)     # sparse: no data written yet
            self.offset = len(header)
        else:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape_, fortran, dtype_ = read_header(fh)
                self.offset = fh.tell()
            if tuple(shape_) != self.shape or np.dtype(dtype_) != self.dtype or fortran:
                raise ValueError(f"{self.path}: holds {shape_} {dtype_}, expected {self.shape} {self.dtype}")
        self._fd = os.open(self.path, os.O_RDWR)

    @classmethod
    def matches(cls, path: PathLike, shape: Tuple[int, ...], dtype) -> bool:
        """True when ``path`` is a complete row file of ``shape`` and ``dtype``."""
        try:
            rows = cls(path, shape, dtype, create=False)
        except (OSError, ValueError):
            return False
        try:
            return os.fstat(rows._fd).st_size == rows.offset + rows.shape[0] * rows.row_bytes
        finally:
            rows.close()

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (len(rows), *shape[1:]) to the ascending row indices ``rows``, one
        ``pwrite`` per run of consecutive rows."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        for lo, hi in _runs(rows):
            data = memoryview(values[lo:hi]).cast("B")
            at, done = self.offset + int(rows[lo]) * self.row_bytes, 0
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], at + done)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending) as a fresh ``(len(rows), *shape[1:])`` array."""
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        flat = memoryview(out).cast("B")
        for lo, hi in _runs(rows):
            at, want = self.offset + int(rows[lo]) * self.row_bytes, (hi - lo) * self.row_bytes
            view, done = flat[lo * self.row_bytes:hi * self.row_bytes], 0
            while done < want:
                n = os.preadv(self._fd, [view[done:]], at + done)
                if n == 0:
                    raise OSError(f"{self.path}: shorter than its header says")
                done += n
        return out

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _runs(rows: np.ndarray) -> Iterable[Tuple[int, int]]:
    """``(lo, hi)`` positions in ``rows`` of each run of consecutive row indices."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = np.concatenate([[0], cuts, [len(rows)]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


class BlockLog:
    """Finished blocks of one process: ``{"options": ...}`` on the first line, then one
    ``{"block": b, "failed": [[entry, reason], ...]}`` line per block, appended and synced."""

    def __init__(self, path: PathLike, options: Dict[str, Any]) -> None:
        self.path, self.options = Path(path), options

    @staticmethod
    def read(path: PathLike, options: Dict[str, Any]) -> Dict[int, List[Tuple[int, str]]]:
        """``{block: failures}`` of a log written with the same ``options`` ({} otherwise)."""
        try:
            lines = Path(path).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            return {}
        records = []
        for line in lines[:-1]:                       # the last piece has no newline: cut short, or empty
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                return {}
        if not records or records[0].get("options") != options:
            return {}
        return {int(r["block"]): [(int(e), str(why)) for e, why in r["failed"]] for r in records[1:]}

    def open(self) -> None:
        """Continue the log of a run with the same options (dropping a line cut short), or start one."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        try:
            same = json.loads(data.split(b"\n", 1)[0]).get("options") == self.options
        except (ValueError, AttributeError):
            same = False
        if same:
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
        else:
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"options": self.options}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def mark(self, block: int, failed: List[Tuple[int, str]]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"block": int(block), "failed": [[int(e), why] for e, why in failed]}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
