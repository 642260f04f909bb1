"""``vsl index``: encode a gallery once into an index folder (:mod:`.store`), resumably.

A gallery is a split with its captions or a folder of feature files (:mod:`.gallery`). Images are
encoded into region embeddings and shortlist vectors, captions into packed word embeddings and
shortlist vectors, block by block (:func:`vsl.runtime.image_batches` / ``caption_batches``); then
the FAISS indexes of both sides are built (:mod:`.faiss_index`) and the manifest is written last.
Under torchrun every process encodes its own contiguous run of blocks into the shared files and
rank 0 builds the FAISS indexes and the manifest.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..config import INDEX_DTYPES
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, atomic_write_text, check_writable
from ..runtime import LoadedModel, caption_batches, image_batches
from .faiss_index import check_index_type, make_faiss, write_faiss
from .gallery import Gallery, feature_gallery, split_gallery
from .grow import sweep
from .segments import segment_file
from .store import (BLOCK_CAPTIONS, BLOCK_IMAGES, FILES, INDEX_FORMAT, MANIFEST, BlockProgress, barrier,
                    bytes_per_image, open_array, reusable, sha256_file, versions, write_blocks, write_manifest)

PathLike = Union[str, os.PathLike]


def _gallery(loaded: LoadedModel, checkpoint: PathLike, data_path: Optional[PathLike], split: str,
             features: Optional[PathLike]) -> Tuple[Gallery, Dict[str, Any]]:
    """The gallery to index and the options that name its source."""
    config = loaded.config
    if features is not None:
        gallery = feature_gallery(features)
        for name, have in (("img_dim", gallery.img_dim), ("num_regions", gallery.num_regions)):
            if getattr(config, name) != have:
                raise CheckpointError(f"{checkpoint}: the model expects {name} {getattr(config, name)}, "
                                      f"the features in {features} have {have}")
        return gallery, {"features": [str(Path(s).resolve()) for s in gallery.sources]}
    data_path = data_path if data_path is not None else config.data_path
    gallery = split_gallery(loaded.open_split(data_path, split).dataset)
    return gallery, {"data_path": str(Path(data_path).resolve()), "split": split, "data_name": config.data_name}


@torch.inference_mode()
def build_index(checkpoint: PathLike, data_path: Optional[PathLike] = None, split: str = "test",
                out: PathLike = "index", *, data_name: Optional[str] = None, vocab_path: Optional[PathLike] = None,
                features: Optional[PathLike] = None, dtype: str = "float16", index_type: str = "flat",
                batch_size: int = 128, device: str = "auto", progress: bool = True, distributed=None,
                block_images: int = BLOCK_IMAGES, block_captions: int = BLOCK_CAPTIONS) -> Path:
    """Encode a split (or a pure image gallery: ``features``, a folder of ``.npy`` files) into ``out``.

    ``checkpoint`` must have a shortlist head. ``index_type``: ``flat``, ``hnsw``, ``ivf`` or a FAISS
    factory string (:mod:`.faiss_index`). Returns the index folder. ``distributed`` (a
    :class:`vsl.distributed.DistInfo` under torchrun): each process encodes its run of blocks.
    Running the same command again after an interruption resumes at the first unfinished block;
    an index already complete for the same checkpoint and options is left as it is.
    """
    from ..device import resolve_device
    from ..runtime import load_for_use

    if dtype not in INDEX_DTYPES:
        raise ConfigError(f"index dtype must be one of {INDEX_DTYPES}, got {dtype!r}")
    check_index_type(index_type)
    if batch_size < 1 or block_images < 1 or block_captions < 1:
        raise ConfigError(f"batch and block sizes must be positive, got {batch_size}, {block_images}, {block_captions}")
    rank = distributed.rank if distributed is not None else 0
    is_main = rank == 0
    out = Path(out)
    check_writable(out, "folder")
    dev = distributed.device if distributed is not None else resolve_device(device)
    loaded = load_for_use(checkpoint, dev, vocab_path, data_name, shortlist=True)
    config = loaded.config
    gallery, source = _gallery(loaded, checkpoint, data_path, split, features)
    n, m = gallery.num_images, len(gallery.captions)
    d, dim = config.embed_size, config.shortlist_dim
    tokens = Tokens.encode(loaded.vocab, gallery.captions)
    offsets = tokens.offsets
    options = {"format": INDEX_FORMAT, "checkpoint_sha256": sha256_file(checkpoint), "dtype": dtype,
               "index_type": index_type, "num_images": n, "num_captions": m, "embed_size": d,
               "shortlist_dim": dim, "num_regions": gallery.num_regions, "block_images": block_images,
               "block_captions": block_captions, **source}

    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()).get("options") == options:
                return out                                         # complete and up to date
        except (OSError, json.JSONDecodeError):
            pass
        if is_main:
            manifest_path.unlink()          # the old index is being replaced: never leave a stale manifest
    barrier(distributed)
    encode_gallery(out, "", loaded, gallery, tokens, options, dtype, dev, distributed=distributed,
                   show=progress and is_main, batch_size=batch_size, block_images=block_images,
                   block_captions=block_captions)
    barrier(distributed)
    if is_main:
        _finish(out, loaded, checkpoint, gallery, options, source, offsets, index_type)
    barrier(distributed)
    return out


@dataclass
class Tokens:
    """The word ids of a gallery's captions, packed: caption j is ``ids[offsets[j]:offsets[j + 1]]``
    (``<start>`` and ``<end>`` included), so its words are the same rows of the packed word
    embeddings. Four bytes a word: a million images' five million captions hold a few hundred MB,
    and a block is padded only when it is encoded."""

    ids: np.ndarray          # (W,) int32
    offsets: np.ndarray      # (m + 1,) int64

    @classmethod
    def encode(cls, vocab, captions, chunk: int = 65536) -> "Tokens":
        parts, lengths = [], np.zeros(len(captions), dtype=np.int64)
        for lo in range(0, len(captions), chunk):
            encoded = [vocab.encode(c) for c in captions[lo:lo + chunk]]
            lengths[lo:lo + len(encoded)] = [len(t) for t in encoded]
            count = int(lengths[lo:lo + len(encoded)].sum())
            parts.append(np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=count))
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(ids, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def padded(self, lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Captions ``lo:hi`` as zero-padded ``(hi - lo, L)`` int64 ids and ``(hi - lo,)`` lengths."""
        starts = self.offsets[lo:hi]
        lengths = self.offsets[lo + 1:hi + 1] - starts
        width = int(lengths.max())
        valid = np.arange(width)[None, :] < lengths[:, None]
        out = np.zeros((hi - lo, width), dtype=np.int64)
        out[valid] = self.ids[(starts[:, None] + np.arange(width)[None, :])[valid]]
        return torch.from_numpy(out), torch.from_numpy(lengths)


def encode_gallery(out: Path, suffix: str, loaded: LoadedModel, gallery: Gallery, tokens: Tokens,
                   options: Dict[str, Any],
                   dtype: str, dev, *, distributed=None, show: bool = True, batch_size: int = 128,
                   block_images: int = BLOCK_IMAGES, block_captions: int = BLOCK_CAPTIONS) -> None:
    """Encode ``gallery`` into the files of the segment ``suffix`` of ``out`` (:mod:`.segments`), block
    by block, resuming the blocks a run with the same ``options`` finished (its progress files are
    named after the segment; the caller removes them once the segment is listed in a manifest)."""
    model = loaded.model
    config = loaded.config
    rank = distributed.rank if distributed is not None else 0
    n, m = gallery.num_images, len(gallery.captions)
    d, dim = config.embed_size, config.shortlist_dim
    offsets = tokens.offsets
    side = f"segment{suffix}-" if suffix else ""
    img_progress = BlockProgress(out, f"{side}images", options, rank)
    cap_progress = BlockProgress(out, f"{side}captions", options, rank)
    store = np.float16 if dtype == "float16" else np.float32
    names = {key: segment_file(key, suffix) for key in FILES}
    arrays = {"regions": ((n, gallery.num_regions, d), store), "image_global": ((n, dim), np.float32)}
    if m:
        arrays.update(words=((int(offsets[-1]), d), store), caption_global=((m, dim), np.float32))
    img_done, cap_done = img_progress.finished(), cap_progress.finished()
    if not all(reusable(out / names[key], shape, kind) for key, (shape, kind) in arrays.items()):
        img_done, cap_done = set(), set()            # finished blocks are only trusted in their own files
    fresh = not img_done and not cap_done
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for key, (shape, kind) in arrays.items():
            open_array(out / names[key], shape, kind, fresh)
    barrier(distributed)

    # Images: region embeddings and global vectors, block by block.
    regions = np.lib.format.open_memmap(out / names["regions"], mode="r+")
    img_global = np.lib.format.open_memmap(out / names["image_global"], mode="r+")

    def write_images(lo: int, hi: int, bar) -> None:
        for i, j, emb in image_batches(model, gallery, start=lo, stop=hi, batch_size=batch_size, bar=bar):
            regions[i:j] = emb.cpu().numpy().astype(store)                              # emb (b, R, d)
            img_global[i:j] = model.shortlist.images(emb).cpu().numpy()

    write_blocks("images", n, block_images, write_images, (regions, img_global), img_progress, img_done,
                 distributed, show)
    del regions, img_global

    # Captions: word embeddings back to back, and global vectors.
    if m:
        words = np.lib.format.open_memmap(out / names["words"], mode="r+")
        cap_global = np.lib.format.open_memmap(out / names["caption_global"], mode="r+")

        def write_captions(lo: int, hi: int, bar) -> None:
            ids, lens = tokens.padded(lo, hi)                                           # one block at a time
            for i, j, emb, batch_lens in caption_batches(model, ids, lens, batch_size=batch_size, bar=bar):
                i, j = i + lo, j + lo                                                   # emb (b, L, d)
                mask = torch.arange(emb.size(1)) < batch_lens.unsqueeze(1)
                words[offsets[i]:offsets[j]] = emb.cpu()[mask].numpy().astype(store)   # row-major = caption order
                cap_global[i:j] = model.shortlist.captions(emb, batch_lens.to(dev)).cpu().numpy()

        write_blocks("captions", m, block_captions, write_captions, (words, cap_global), cap_progress, cap_done,
                     distributed, show)
        del words, cap_global


def _finish(out: Path, loaded: LoadedModel, checkpoint: PathLike, gallery: Gallery, options: Dict[str, Any],
            source: Dict[str, Any], offsets: np.ndarray, index_type: str) -> None:
    """The FAISS indexes, the captions, the vocabulary and, last, the manifest (rank 0)."""
    config = loaded.config
    n, m = gallery.num_images, len(gallery.captions)
    files = [FILES["regions"], FILES["image_global"], FILES["image_faiss"]]
    write_faiss(out / FILES["image_faiss"], make_faiss(np.load(out / FILES["image_global"], mmap_mode="r"),
                                                       index_type))
    if m:
        write_faiss(out / FILES["caption_faiss"],
                    make_faiss(np.load(out / FILES["caption_global"], mmap_mode="r"), index_type))
        atomic_write(out / FILES["offsets"], lambda fh: np.save(fh, offsets))
        atomic_write_text(out / FILES["captions"], "".join(c + "\n" for c in gallery.captions))
        files += [FILES[k] for k in ("words", "offsets", "caption_global", "caption_faiss", "captions")]
    vocab_name = f"{config.data_name}_vocab.json"
    loaded.vocab.to_json(out / vocab_name)
    files.append(vocab_name)
    write_manifest(out, {
        "format": INDEX_FORMAT, "options": options, "versions": versions(),
        "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": options["checkpoint_sha256"],
        "model": config.module_name, "data_name": config.data_name, "split": source.get("split"),
        "num_images": n, "num_captions": m, "captions_per_image": gallery.captions_per_image,
        "num_regions": gallery.num_regions, "embed_size": config.embed_size, "shortlist_dim": config.shortlist_dim,
        "dtype": options["dtype"], "index_type": index_type, "bytes_per_image": bytes_per_image(out, files, n),
        "files": {f: (out / f).stat().st_size for f in files}, "created": time.time(), "generation": 0,
        "segments": [{"suffix": "", "images": n, "captions": m, "generation": 0}], "next_segment": 1,
        "sources": [{"first_image": 0, "images": n, "source": source}],
        "faiss": {"images": FILES["image_faiss"], "captions": FILES["caption_faiss"]},
    })
    for path in out.glob("progress-*.json"):
        path.unlink(missing_ok=True)
    sweep(out, files)
