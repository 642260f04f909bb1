"""The index folder: its layout, its manifest (written last) and its resumable blocks.

An index folder holds, for a checkpoint with a shortlist head (:mod:`vsl.models.shortlist`)::

    images.regions.npy     (n, R, d) region embeddings, float16 or float32, memory-mapped at search time
    images.global.npy      (n, D) float32 shortlist vectors (l2-normalised)
    images.faiss           FAISS inner-product index of them (:mod:`.faiss_index`)
    captions.words.npy     (W, d) word embeddings of all captions, one row per word, captions back to back
    captions.offsets.npy   (m + 1,) int64: caption j is rows offsets[j]:offsets[j + 1]
    captions.global.npy    (m, D) float32, captions.faiss, captions.txt        (splits with captions only)
    {data_name}_vocab.json the vocabulary of the text queries
    manifest.json          checkpoint SHA-256, options, sizes and versions -- written last
    progress-{side}-r{rank}.json   finished blocks of an unfinished build (removed when it completes)

Arrays are written in blocks of :data:`BLOCK_IMAGES` images (:data:`BLOCK_CAPTIONS` captions); each
finished block is recorded in a progress file, so that an interrupted build, run again with the same
options, resumes at the first unfinished block. Under torchrun every process writes its own
contiguous run of blocks into the shared files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import DataError
from ..fileio import atomic_write_text, sha256_file
from ..logs import progress_bar

PathLike = Union[str, os.PathLike]
INDEX_FORMAT = "vsl-index-1"
MANIFEST = "manifest.json"
BLOCK_IMAGES = 1024
BLOCK_CAPTIONS = 4096

FILES = {
    "regions": "images.regions.npy", "image_global": "images.global.npy", "image_faiss": "images.faiss",
    "words": "captions.words.npy", "offsets": "captions.offsets.npy", "caption_global": "captions.global.npy",
    "caption_faiss": "captions.faiss", "captions": "captions.txt",
}



def read_manifest(path: Path) -> Dict[str, Any]:
    """The manifest of the index folder ``path``, after checking that every listed file has its size."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"{path}: no such index folder (build one with `vsl index`)")
    if not manifest_path.is_file():
        raise DataError(f"{path}: no {MANIFEST}: not a vsl index, or its build did not finish "
                        "(run the same `vsl index` command again to resume it)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{manifest_path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise DataError(f"{manifest_path}: not a {INDEX_FORMAT} manifest")
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise DataError(f"{file}: missing index file (rebuild the index with `vsl index`)")
        actual = file.stat().st_size
        if actual != size:
            raise DataError(f"{file}: {actual} bytes, expected {size} (truncated or changed; rebuild the index)")
    return manifest


def write_manifest(path: Path, manifest: Dict[str, Any]) -> None:
    """Write the manifest of the index folder ``path`` atomically (last: the index is then complete)."""
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def block_range(num_blocks: int, distributed) -> range:
    """This process's contiguous run of blocks (all of them without torchrun)."""
    if distributed is None or distributed.world_size == 1:
        return range(num_blocks)
    r, w = distributed.rank, distributed.world_size
    return range(num_blocks * r // w, num_blocks * (r + 1) // w)


class BlockProgress:
    """Finished blocks of one side ("images"/"captions"), one JSON file per process, for resume."""

    def __init__(self, out: Path, side: str, options: Dict[str, Any], rank: int):
        self.out, self.side, self.options, self.rank = out, side, options, rank
        self.path = out / f"progress-{side}-r{rank}.json"
        self.done: List[int] = []

    def finished(self) -> set:
        """Blocks recorded by any process of a build with the same options."""
        done = set()
        for path in self.out.glob(f"progress-{self.side}-r*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if state.get("options") == self.options:
                done.update(int(b) for b in state.get("blocks", []))
                if path == self.path:
                    self.done = [int(b) for b in state.get("blocks", [])]
        return done

    def mark(self, block: int) -> None:
        self.done.append(block)
        atomic_write_text(self.path, json.dumps({"options": self.options, "blocks": self.done}))


def write_blocks(side: str, total: int, block: int, write: Callable[[int, int, Any], None],
                 arrays: Sequence[np.ndarray], progress: "BlockProgress", done: set, distributed, show: bool) -> None:
    """Fill this process's unfinished blocks of ``total`` items (``block`` each), ``write(lo, hi, bar)``
    writing rows ``lo:hi`` of ``arrays`` (and advancing ``bar`` by rows); a block is marked finished
    only after ``arrays`` are flushed, so a resumed build never trusts rows that did not reach the disk."""
    blocks = [b for b in block_range(-(-total // block), distributed) if b not in done]
    bar = progress_bar(total, f"index {side}", enabled=show, unit=side[:3], unit_scale=True,
                       initial=min(total, len(done) * block))
    for b in blocks:
        write(b * block, min(total, (b + 1) * block), bar)
        for array in arrays:
            array.flush()
        progress.mark(b)
    bar.close()


def reusable(path: Path, shape: Tuple[int, ...], dtype) -> bool:
    """Whether ``path`` is a ``.npy`` file of this shape and dtype (the blocks a resumed build trusts)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return array.shape == tuple(shape) and array.dtype == np.dtype(dtype)


def open_array(path: Path, shape: Tuple[int, ...], dtype, fresh: bool) -> np.ndarray:
    """A writable ``.npy`` memmap: created (sparse) when ``fresh``, else reopened after checking its header."""
    if not fresh and path.is_file():
        try:
            array = np.lib.format.open_memmap(path, mode="r+")
            if array.shape == tuple(shape) and array.dtype == np.dtype(dtype):
                return array
        except (ValueError, OSError):
            pass
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


@torch.inference_mode()
def bytes_per_image(out: Path, files: Sequence[str], n: int) -> float:
    image_files = [f for f in files if f.startswith("images.")]
    return sum((out / f).stat().st_size for f in image_files) / max(1, n)


def versions() -> Dict[str, str]:
    import faiss

    from .. import __version__
    return {"vsl": __version__, "torch": torch.__version__, "numpy": np.__version__, "faiss": faiss.__version__}


def barrier(distributed) -> None:
    if distributed is not None and distributed.world_size > 1:
        import torch.distributed as dist
        dist.barrier(group=distributed.group)
