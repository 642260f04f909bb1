"""An index folder's rows across segments, addressed by stable ids.

A fresh build writes one segment (the files of :data:`vsl.retrieval.store.FILES`); every
``vsl index --add`` appends one more, the same files with a suffix (``images.regions.s1.npy``,
``captions.s1.txt``, ...), listed in the manifest's ``segments`` with their row counts. The rows of
one side (images or captions) are the segments' rows back to back. Ids are the rows' numbers as
they were added; ``vsl index --compact`` drops the rows of removed images and writes the ids of the
rows it kept (``images.ids.g{N}.npy``, ``captions.ids.g{N}.npy``, sorted), so ids never change. The
FAISS indexes hold ids, so a search's candidates are ids; :meth:`Rows.rows` turns them into rows
(a searchsorted on the kept ids, the identity before any compaction).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .store import FILES

#: The options that name what a build or an add indexed.
SOURCE_KEYS = ("data_path", "split", "data_name", "features")


def segment_file(key: str, suffix: str) -> str:
    """The file of ``key`` (a name of :data:`FILES`) in the segment with ``suffix`` ("" = the first)."""
    name = FILES[key]
    stem, dot, ext = name.rpartition(".")
    return f"{stem}{suffix}.{ext}" if suffix else name


def segments(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The manifest's segments, ``{"suffix", "images", "captions", "generation"}`` (rows and the
    generation that wrote them; an index written before segments existed has one, suffix "")."""
    if "segments" in manifest:
        return [dict(s) for s in manifest["segments"]]
    return [{"suffix": "", "images": int(manifest["num_images"]), "captions": int(manifest["num_captions"]),
             "generation": 0}]


def sources(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """What each generation indexed, ``{"first_image", "images", "source"}``: image ids ``first_image +
    i`` are image i of ``source`` (a split's or a features folder's options), compacted or not."""
    if "sources" in manifest:
        return [dict(s) for s in manifest["sources"]]
    source = {k: v for k, v in manifest.get("options", {}).items() if k in SOURCE_KEYS}
    return [{"first_image": 0, "images": int(manifest["num_images"]), "source": source}]


def faiss_files(manifest: Dict[str, Any]) -> Dict[str, str]:
    """The FAISS files of this generation (``images``, ``captions``)."""
    return dict(manifest.get("faiss") or {"images": FILES["image_faiss"], "captions": FILES["caption_faiss"]})


class Stacked:
    """Arrays of the same row shape read as one, by integer row numbers (a memmap reads only those)."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self):
        return (len(self),) + tuple(self.parts[0].shape[1:])

    @property
    def dtype(self):
        return self.parts[0].dtype

    def __getitem__(self, rows) -> np.ndarray:
        """Rows ``rows`` (an int array of any shape) as a fresh ``rows.shape + row shape`` array."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][rows])
        flat = rows.reshape(-1)
        part = np.searchsorted(self.starts, flat, side="right") - 1              # (P,) segment of each row
        out = np.empty((len(flat),) + tuple(self.parts[0].shape[1:]), dtype=self.dtype)
        for s in np.unique(part):                                             # one gather per segment
            take = part == s
            out[take] = self.parts[s][flat[take] - self.starts[s]]
        return out.reshape(rows.shape + out.shape[1:])


class Rows:
    """Which row holds each id of one side: all ids ``0..count-1`` until a compaction, then ``ids``."""

    def __init__(self, count: int, ids: Optional[np.ndarray] = None):
        self.count, self.ids = int(count), ids

    @property
    def num_rows(self) -> int:
        return self.count if self.ids is None else len(self.ids)

    def rows(self, ids) -> np.ndarray:
        """Rows of the (present) ids ``ids``, same shape."""
        ids = np.asarray(ids, dtype=np.int64)
        return ids if self.ids is None else np.searchsorted(self.ids, ids)

    def ids_of(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.ids is None else self.ids[rows]

    def present(self, ids) -> np.ndarray:
        """Whether each id of ``ids`` has a row (ids of compacted-away images have none)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.ids is None:
            return (ids >= 0) & (ids < self.count)
        if not len(self.ids):
            return np.zeros(ids.shape, dtype=bool)
        return self.ids[np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)] == ids


def read_rows(path: Path, manifest: Dict[str, Any], side: str, count: int) -> Rows:
    """The id map of ``side`` ("images"/"captions") of this generation."""
    name = manifest.get(f"{side[:-1]}_ids")
    return Rows(count, None if not name else np.load(path / name))


def open_side(path: Path, manifest: Dict[str, Any], key: str, mmap: bool = True) -> Stacked:
    """The rows of ``key`` (a name of :data:`FILES`) over all segments."""
    return Stacked([np.load(path / segment_file(key, s["suffix"]), mmap_mode="r" if mmap else None)
                    for s in segments(manifest)])


def caption_offsets(path: Path, manifest: Dict[str, Any]) -> np.ndarray:
    """``(rows + 1,)`` int64 offsets of the captions' words in :func:`open_side` ``("words")``."""
    parts, shift = [np.zeros(1, dtype=np.int64)], 0
    for s in segments(manifest):
        if not s["captions"]:
            continue
        local = np.load(path / segment_file("offsets", s["suffix"]))
        parts.append(local[1:] + shift)
        shift += int(local[-1])
    return np.concatenate(parts)


def caption_texts(path: Path, manifest: Dict[str, Any]) -> List[str]:
    """The captions' texts, row by row."""
    texts: List[str] = []
    for s in segments(manifest):
        if s["captions"]:
            text = (path / segment_file("captions", s["suffix"])).read_text(encoding="utf-8")
            texts += text.split("\n")[:s["captions"]]
    return texts
