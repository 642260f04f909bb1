"""``vsl index --add`` and ``--compact``: a gallery that grows, and reclaims what it removed, in place.

An add encodes only the new images (and their captions) into a new segment (:mod:`.segments`),
block by block like a build (an interrupted add, run again, resumes its blocks), adds their
shortlist vectors to the FAISS indexes with ids continuing after the last, and writes the next
generation's manifest last. The manifest's ``history`` records what each generation added, so the
same add run again once it has finished changes nothing. A compaction rewrites the rows of the
images still searchable into one segment with their ids (the FAISS indexes get an id map), so ids
never change. Both hold the writer's lock (:func:`vsl.retrieval.grow.writer_lock`) and write only
files no manifest lists yet, the manifest last: a crash at any moment leaves the previous
generation readable. An add leaves the previous generation's files in place; a compaction deletes
them once its manifest is in place (the space is what it is for).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import atomic_write, atomic_write_text
from ..logs import progress_bar
from .build import Tokens, _gallery, encode_gallery
from .faiss_index import add_vectors, make_faiss, read_faiss, write_faiss
from .grow import generation, removed_images, sweep, writer_lock
from .segments import (caption_offsets, caption_texts, faiss_files, open_side, read_rows, segment_file, segments,
                       sources)
from .store import BLOCK_CAPTIONS, BLOCK_IMAGES, read_manifest, sha256_file, write_manifest

PathLike = Union[str, os.PathLike]
#: The files of a segment, by side.
IMAGE_KEYS, CAPTION_KEYS = ("regions", "image_global"), ("words", "offsets", "caption_global", "captions")


@dataclass
class AddResult:
    """What an add did: the generation that holds the images, how many, and whether it was done before."""

    generation: int
    images: int
    captions: int
    first_image: int
    already: bool = False


def _next_suffix(manifest: Dict[str, Any]) -> str:
    """A segment suffix no generation has used (a reader of an older one may still read its files)."""
    return f".s{int(manifest.get('next_segment', len(segments(manifest))))}"


def _segment_files(suffix: str, captions: bool) -> list:
    return [segment_file(k, suffix) for k in IMAGE_KEYS + (CAPTION_KEYS if captions else ())]


def _clear_progress(out: Path, manifest: Dict[str, Any]) -> None:
    """Progress files of segments the manifest lists (their add finished)."""
    for seg in segments(manifest):
        if seg["suffix"]:
            for path in out.glob(f"progress-segment{seg['suffix']}-*.json"):
                path.unlink(missing_ok=True)


def _next_manifest(manifest: Dict[str, Any], out: Path, new: int, old_faiss: Dict[str, str],
                   changes: Dict[str, Any], added_files, dropped_files=()) -> Dict[str, Any]:
    """The manifest of generation ``new``: ``changes`` applied, the files re-listed with their sizes."""
    dropped = set(dropped_files) | set(old_faiss.values())
    names = [f for f in manifest.get("files", {}) if f not in dropped] + [f for f in added_files]
    result = {**manifest, **changes, "generation": new, "next_segment": int(manifest.get(
        "next_segment", len(segments(manifest)))) + 1, "files": {f: (out / f).stat().st_size for f in names}}
    image_files = [f for f in names if f.startswith("images.")]
    live = int(result["num_images"]) - int(result.get("num_removed", 0))
    result["bytes_per_image"] = sum(result["files"][f] for f in image_files) / max(1, live)
    return result


@torch.inference_mode()
def add_to_index(out: PathLike, checkpoint: PathLike, data_path: Optional[PathLike] = None, split: str = "test", *,
                 features: Optional[PathLike] = None, batch_size: int = 128, device: str = "auto",
                 progress: bool = True, block_images: int = BLOCK_IMAGES,
                 block_captions: int = BLOCK_CAPTIONS) -> AddResult:
    """Append a split (or a features folder) to the index ``out``, encoding only its images and captions.

    ``checkpoint`` must be the one the index was built from (a CheckpointError naming both
    otherwise); the new images get ids ``num_images ...`` and their captions ids after the last
    caption. Returns what was added; an add that already finished returns ``already=True`` and
    changes nothing.
    """
    from ..device import resolve_device
    from ..runtime import load_for_use

    out = Path(out)
    if batch_size < 1 or block_images < 1 or block_captions < 1:
        raise ConfigError(f"batch and block sizes must be positive, got {batch_size}, {block_images}, {block_captions}")
    read_manifest(out)
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    with writer_lock(out):
        manifest = read_manifest(out)                 # under the lock: the newest generation
        digest = sha256_file(checkpoint)
        if digest != manifest["checkpoint_sha256"]:
            raise CheckpointError(
                f"{checkpoint}: SHA-256 {digest[:12]}... is not the checkpoint the index {out} was built from "
                f"({manifest['checkpoint']}, {manifest['checkpoint_sha256'][:12]}...); add with that one "
                "or build a new index")
        dev = resolve_device(device)
        loaded = load_for_use(checkpoint, dev, vocab_path=out, data_name=manifest["data_name"], shortlist=True)
        gallery, source = _gallery(loaded, checkpoint, data_path, split, features)
        where = features if features is not None else f"split {split!r} of {source.get('data_path')}"
        n, m = gallery.num_images, len(gallery.captions)
        if gallery.num_regions != int(manifest["num_regions"]):
            raise ConfigError(f"{where}: {gallery.num_regions} regions per image, the index {out} has "
                              f"{manifest['num_regions']}")
        if gallery.captions_per_image != int(manifest["captions_per_image"]):
            raise ConfigError(f"{where}: {gallery.captions_per_image} captions per image, the index {out} has "
                              f"{manifest['captions_per_image']} (a gallery with captions grows only by images "
                              "with as many captions, a pure image gallery only by images)")
        if n == 0:
            raise DataError(f"{where}: no images to add")
        options = {"checkpoint_sha256": digest, "num_images": n, "num_captions": m, "block_images": block_images,
                   "block_captions": block_captions, **source}
        for step in manifest.get("history", []):
            if step.get("options") == options:
                _clear_progress(out, manifest)
                return AddResult(int(step["generation"]), n, m, int(step["first_image"]), already=True)

        first_image, first_caption = int(manifest["num_images"]), int(manifest["num_captions"])
        suffix, new = _next_suffix(manifest), generation(manifest) + 1
        tokens = Tokens.encode(loaded.vocab, gallery.captions)
        encode_gallery(out, suffix, loaded, gallery, tokens, options, manifest["dtype"], dev, show=progress,
                       batch_size=batch_size, block_images=block_images, block_captions=block_captions)
        if m:
            atomic_write(out / segment_file("offsets", suffix), lambda fh: np.save(fh, tokens.offsets))
            atomic_write_text(out / segment_file("captions", suffix), "".join(c + "\n" for c in gallery.captions))
        old_faiss = faiss_files(manifest)
        faiss = {"images": f"images.g{new}.faiss", "captions": f"captions.g{new}.faiss"}
        added = _segment_files(suffix, bool(m)) + [faiss["images"]] + ([faiss["captions"]] if m else [])
        for side, key, first in (("images", "image_global", first_image), ("captions", "caption_global", first_caption)):
            if side == "captions" and not m:
                continue
            index = read_faiss(out / old_faiss[side])
            add_vectors(index, np.load(out / segment_file(key, suffix), mmap_mode="r"), first)
            write_faiss(out / faiss[side], index)
        changes: Dict[str, Any] = {
            "num_images": first_image + n, "num_captions": first_caption + m, "faiss": faiss,
            "segments": segments(manifest) + [{"suffix": suffix, "images": n, "captions": m, "generation": new}],
            "sources": sources(manifest) + [{"first_image": first_image, "images": n, "source": source}],
            "history": manifest.get("history", []) + [{"generation": new, "added": n, "captions": m,
                                                       "first_image": first_image, "options": options}]}
        dropped = []
        for side, first, count in (("image", first_image, n), ("caption", first_caption, m)):
            name = manifest.get(f"{side}_ids")
            if name:                      # a compacted index maps ids to rows: the new rows' ids follow
                ids = np.concatenate([np.load(out / name), np.arange(first, first + count, dtype=np.int64)])
                changes[f"{side}_ids"] = f"{side}s.ids.g{new}.npy"
                atomic_write(out / changes[f"{side}_ids"], lambda fh, ids=ids: np.save(fh, ids))
                added.append(changes[f"{side}_ids"])
                dropped.append(name)
        result = _next_manifest(manifest, out, new, old_faiss, changes, added, dropped)
        write_manifest(out, result)
        _clear_progress(out, result)
        sweep(out, result["files"], manifest["files"])
    return AddResult(new, n, m, first_image)


def compact_index(out: PathLike, progress: bool = True) -> Optional[int]:
    """Rewrite the index ``out`` without the rows of its removed images, keeping every id; returns the
    new generation, or None when no removed image still holds a row (nothing to reclaim)."""
    out = Path(out)
    read_manifest(out)
    with writer_lock(out):
        manifest = read_manifest(out)
        removed = removed_images(out, manifest)
        n, m, cpi = int(manifest["num_images"]), int(manifest["num_captions"]), int(manifest["captions_per_image"])
        image_rows, caption_rows = read_rows(out, manifest, "images", n), read_rows(out, manifest, "captions", m)
        if not image_rows.present(removed).any():
            return None
        new, suffix = generation(manifest) + 1, _next_suffix(manifest)
        all_images = image_rows.ids if image_rows.ids is not None else np.arange(n, dtype=np.int64)
        keep_images = all_images[~np.isin(all_images, removed)]                  # (n',) sorted ids
        rows = image_rows.rows(keep_images)
        store = np.float16 if manifest["dtype"] == "float16" else np.float32
        bar = progress_bar(2 * len(rows) + (len(rows) * cpi if m else 0), "compact", enabled=progress, unit="row")
        _copy_rows(open_side(out, manifest, "regions"), rows, out / segment_file("regions", suffix), store, bar)
        _copy_rows(open_side(out, manifest, "image_global"), rows, out / segment_file("image_global", suffix),
                   np.float32, bar)
        keep_captions = np.zeros(0, dtype=np.int64)
        if m:
            all_captions = caption_rows.ids if caption_rows.ids is not None else np.arange(m, dtype=np.int64)
            keep_captions = all_captions[np.isin(all_captions // cpi, keep_images)]
            crows = caption_rows.rows(keep_captions)
            _copy_rows(open_side(out, manifest, "caption_global"), crows,
                       out / segment_file("caption_global", suffix), np.float32, bar)
            offsets = caption_offsets(out, manifest)
            starts, lengths = offsets[crows], offsets[crows + 1] - offsets[crows]
            local = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            word_rows = np.repeat(starts - local[:-1], lengths) + np.arange(int(local[-1]))    # (W',)
            _copy_rows(open_side(out, manifest, "words"), word_rows, out / segment_file("words", suffix), store, None)
            atomic_write(out / segment_file("offsets", suffix), lambda fh: np.save(fh, local))
            texts = np.asarray(caption_texts(out, manifest), dtype=object)[crows]
            atomic_write_text(out / segment_file("captions", suffix), "".join(t + "\n" for t in texts))
        bar.close()
        faiss = {"images": f"images.g{new}.faiss", "captions": f"captions.g{new}.faiss"}
        ids = {"image_ids": f"images.ids.g{new}.npy", "caption_ids": f"captions.ids.g{new}.npy"}
        write_faiss(out / faiss["images"], make_faiss(np.load(out / segment_file("image_global", suffix),
                                                              mmap_mode="r"), manifest["index_type"], ids=keep_images))
        atomic_write(out / ids["image_ids"], lambda fh: np.save(fh, keep_images))
        added = _segment_files(suffix, bool(m)) + [faiss["images"], ids["image_ids"]]
        if m:
            write_faiss(out / faiss["captions"], make_faiss(np.load(out / segment_file("caption_global", suffix),
                                                                    mmap_mode="r"), manifest["index_type"],
                                                            ids=keep_captions))
            atomic_write(out / ids["caption_ids"], lambda fh: np.save(fh, keep_captions))
            added += [faiss["captions"], ids["caption_ids"]]
        else:
            ids.pop("caption_ids")
        old_segments = [f for s in segments(manifest) for f in _segment_files(s["suffix"], bool(m))]
        dropped = old_segments + [manifest[k] for k in ("image_ids", "caption_ids") if manifest.get(k)]
        changes = {"faiss": faiss, **ids,
                   "segments": [{"suffix": suffix, "images": len(keep_images), "captions": len(keep_captions),
                                 "generation": new}],
                   "history": manifest.get("history", []) + [{"generation": new,
                                                              "compacted": int(len(all_images) - len(keep_images))}]}
        result = _next_manifest(manifest, out, new, faiss_files(manifest), changes, added, dropped)
        write_manifest(out, result)
        # Reclaiming is the point: the previous generation's rows go now. A reader that has opened
        # them keeps reading them (deleting an open file frees it at close); one that read the old
        # manifest but had not opened its files yet opens the new generation (Index._open).
        sweep(out, result["files"])
    return new


def _copy_rows(source, rows: np.ndarray, path: Path, dtype, bar, block: int = BLOCK_IMAGES) -> None:
    """Write ``source[rows]`` (:class:`.segments.Stacked`) to a new ``.npy`` at ``path``, a block at a time."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(rows),) + source.shape[1:])
    for lo in range(0, len(rows), block):
        array[lo:lo + block] = source[rows[lo:lo + block]]
        if bar is not None:
            bar.update(min(block, len(rows) - lo))
    array.flush()
    del array
