"""``vsl extract``: a folder (or list) of photos -> region features in the SCAN layout.

What one run writes in ``DATA/NAME_precomp/`` (``R`` = 36 with ``--boxes 36``; with ``--boxes
MIN:MAX`` the adaptive variant, ``R`` = MAX and the rows are zero-padded)::

    {split}_ims.npy       (N, R, D) float32 region features (D = 2,048 with the published weights)
    {split}_boxes.npy     (N, R, 4) float32 x1, y1, x2, y2 in the original image's pixels
    {split}_counts.npy    (N,) int64 regions of each image: R for --boxes 36; the first counts[i]
                          rows of image i are its regions, the rest zeros, for --boxes MIN:MAX
    {split}_sizes.npy     (N, 2) int64 height, width of each original image (after EXIF orientation)
    {split}_images.txt    the source path of every row, one per line, in row order
    {split}_failed.txt    every skipped entry: "path<TAB>reason", one per line (empty when none)
    {split}_caps.txt      with --captions: the captions of the extracted images, 5 (or 1) per row
    {split}_thumbs/{i}.png  a picture of row i for vsl serve's page (longest side 256 pixels)
    {split}_extract.json  what was run (options, weights' SHA-256, counts): written last

Rows follow the listing (:func:`vsl.data.images.list_images`: a folder's files sorted by their
relative path, or a list file's lines), without the entries that could not be read.

While it runs, everything goes to ``.{split}_extract/`` beside them: row files of one row per
listed entry (:class:`.rows.RowFile`), filled block by block (``block_images`` entries) and one
block log per process (:class:`.rows.BlockLog`). Running the same command again after an
interruption resumes at the first unfinished block. At the end each final file is moved into place
by a rename (a reader never sees a half-written one), ``{split}_ims.npy`` and then the record last.
Under torchrun each process extracts its contiguous run of blocks into the same row files; rank 0
assembles the outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.captions import read_captions
from ..data.images import THUMBNAIL_SIDE, ImageList, list_images, read_image, thumbnail_png
from ..errors import ConfigError, DataError, ImageError
from ..fileio import atomic_write, atomic_write_text, check_writable, sha256_file, temporary_sibling
from ..logs import progress_bar
from .rows import BlockLog, RowFile

PathLike = Union[str, os.PathLike]
FORMAT = "vsl-extract-1"
#: Entries per block: the unit of resumption (a few minutes of CPU work at the published width).
BLOCK_IMAGES = 64
DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Rows copied at once when the final feature file leaves out failed entries (~75 MB at 36 x 2,048).
COPY_ROWS = 256
ARRAYS = ("ims", "boxes", "counts", "sizes")


@dataclass
class ExtractResult:
    """What a run wrote: the folder, the number of rows, the skipped entries and the time it took."""

    folder: Path
    split: str
    num_images: int
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_images: int = 0
    already_complete: bool = False



def final_paths(folder: Path, split: str) -> Dict[str, Path]:
    names = {"ims": "ims.npy", "boxes": "boxes.npy", "counts": "counts.npy", "sizes": "sizes.npy",
             "images": "images.txt", "failed": "failed.txt", "caps": "caps.txt", "thumbs": "thumbs",
             "record": "extract.json"}
    return {k: folder / f"{split}_{v}" for k, v in names.items()}


def check_captions(captions: PathLike, listing: ImageList) -> Tuple[List[str], int]:
    """The caption lines and captions per entry: 5 (or 1) lines per listed entry, in listing order."""
    lines = read_captions(captions)
    n = len(listing)
    for per in (5, 1):
        if len(lines) == per * n:
            return lines, per
    raise DataError(f"{captions}: {len(lines)} captions for the {n} entries of {listing.source}; expected "
                    f"{5 * n} (5 per image, in the listing's order) or {n}")


# ----------------------------------------------------------------------------------------------
# Decoding (in the loader's worker processes)
# ----------------------------------------------------------------------------------------------
class DecodedEntries(Dataset):
    """Entry ``e`` of a listing, decoded: ``(e, image (H, W, 3) uint8 tensor or None, reason or None)``.

    The thumbnail of a readable entry is written to ``thumbs/{e}.png`` here, in the worker, so
    that neither the picture nor its encoding crosses to the main process.
    """

    def __init__(self, listing: ImageList, thumbs: Path, thumbnail_side: int = THUMBNAIL_SIDE) -> None:
        self.paths, self.first, self.thumbs, self.side = listing.paths, listing.first, thumbs, thumbnail_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, e: int):
        path = self.paths[e]
        if self.first[e] != e:
            return e, None, f"duplicate of {self.paths[self.first[e]]}"
        if "\n" in str(path) or "\t" in str(path):
            return e, None, "the file name holds a line break or tab (cannot be listed one per line)"
        try:
            image = read_image(path)
        except ImageError as exc:
            message = str(exc)
            return e, None, message[len(str(path)) + 2:] if message.startswith(f"{path}: ") else message
        (self.thumbs / f"{e}.png").write_bytes(thumbnail_png(image, self.side))
        return e, torch.from_numpy(image), None


def _as_is(item):
    return item


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _block_range(num_blocks: int, distributed) -> range:
    if distributed is None or distributed.world_size == 1:
        return range(num_blocks)
    r, w = distributed.rank, distributed.world_size
    return range(num_blocks * r // w, num_blocks * (r + 1) // w)


def _barrier(distributed) -> None:
    if distributed is not None and distributed.world_size > 1:
        from ..distributed import barrier

        barrier()


def _layout(selection) -> int:
    """Rows per image of the files: the fixed count, or the adaptive variant's maximum."""
    return int(selection.max_boxes)


@torch.inference_mode()
def extract_images(images: PathLike, weights: PathLike, out: PathLike, data_name: str, split: str, *,
                   captions: Optional[PathLike] = None, batch_size: int = 4, device: str = "auto",
                   dtype: str = "float32", boxes: str = "36", workers: int = 2,
                   block_images: int = BLOCK_IMAGES, progress: bool = True, distributed=None,
                   thumbnail_side: int = THUMBNAIL_SIDE) -> ExtractResult:
    """Extract the region features of every readable image of ``images`` (a folder or a list file)
    with the detector ``weights`` into ``out/data_name/`` (see the module's docstring for the files).

    ``boxes``: ``"36"`` (SCAN's fixed 36) or ``"MIN:MAX"`` (adaptive, e.g. ``"10:100"``).
    ``workers``: decoding processes (0 = decode in this process). ``distributed``: a
    :class:`vsl.distributed.DistInfo` under torchrun. Raises :class:`vsl.errors.VSLError` for a
    bad listing, caption file, option, weights file or output folder (nothing written), and
    :class:`vsl.errors.ImageError` when no entry could be read (nothing written either).
    """
    from ..device import resolve_device
    from ..vision import BoxSelection, load_detector

    started = time.time()
    if batch_size < 1 or block_images < 1 or workers < 0:
        raise ConfigError(f"--batch and the block size must be >= 1 and --workers >= 0, got {batch_size}, "
                          f"{block_images}, {workers}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if not split or any(c in split for c in "/\\\0") or split.startswith("."):
        raise ConfigError(f"--split {split!r}: expected a plain name such as test or train")
    if not data_name or any(c in data_name for c in "/\\\0") or data_name.startswith("."):
        raise ConfigError(f"--data_name {data_name!r}: expected a plain folder name such as photos_precomp")
    rank = distributed.rank if distributed is not None else 0
    is_main = rank == 0
    folder = Path(out) / data_name
    check_writable(folder, "folder")
    listing = list_images(images)
    caption_lines, per_image = check_captions(captions, listing) if captions is not None else (None, 0)
    selection = BoxSelection.parse(str(boxes))
    if not Path(weights).is_file():
        raise ConfigError(f"--weights {weights}: file not found (expected the detector's .pth state dict; "
                          "--fetch downloads it by its Hub name)")
    dev = distributed.device if distributed is not None else resolve_device(device)
    detector = load_detector(weights, device=dev, dtype=DTYPES[dtype])
    n, regions, dim = len(listing), _layout(selection), int(detector.feature_dim)
    options = {"format": FORMAT, "entries": n,
               "entries_sha256": hashlib.sha256("\n".join(map(str, listing.paths)).encode()).hexdigest(),
               "weights_sha256": sha256_file(weights), "boxes": str(boxes), "dtype": dtype,
               "regions": regions, "feature_dim": dim, "block_images": block_images,
               "thumbnail_side": thumbnail_side}
    paths = final_paths(folder, split)
    captions_sha = sha256_file(captions) if captions is not None else None
    done_before = _complete(paths, options, captions_sha)
    if done_before is not None:
        return ExtractResult(folder, split, done_before["num_images"],
                             [tuple(x) for x in done_before["failed"]], time.time() - started,
                             already_complete=True)

    created = not folder.exists()
    stage = folder / f".{split}_extract"
    shapes = {"ims": ((n, regions, dim), np.float32), "boxes": ((n, regions, 4), np.float32),
              "counts": ((n,), np.int64), "sizes": ((n, 2), np.int64)}
    if is_main:
        _prepare_stage(stage, options, shapes)
    _barrier(distributed)
    done = _finished_blocks(stage, options)
    log = BlockLog(stage / f"blocks-r{rank}.jsonl", options)
    log.open()
    num_blocks = -(-n // block_images)
    todo = [b for b in _block_range(num_blocks, distributed) if b not in done]
    mine = _block_range(num_blocks, distributed)
    share = sum(min(n, (b + 1) * block_images) - b * block_images for b in mine)
    resumed = share - sum(min(n, (b + 1) * block_images) - b * block_images for b in todo)
    if resumed and is_main and progress:
        print(f"vsl extract: resuming in {stage}: {resumed} of {share} entries already done", file=sys.stderr,
              flush=True)
    files = {k: RowFile(stage / f"{k}.npy", *shapes[k], create=False) for k in ARRAYS}
    try:
        _run_blocks(detector, selection, listing, todo, block_images, batch_size, workers, files, log, stage,
                    thumbnail_side, progress_bar(share, "extract", enabled=progress and is_main, unit="img",
                                                 initial=resumed), show_failures=progress)
    finally:
        for f in files.values():
            f.close()
    _barrier(distributed)
    result = ExtractResult(folder, split, 0, seconds=0.0, resumed_images=resumed)
    try:
        if is_main:
            result = _assemble(stage, folder, split, paths, listing, options, shapes, caption_lines, per_image,
                               captions_sha, created, images)
            result.resumed_images, result.seconds = resumed, time.time() - started
    finally:
        _barrier(distributed)            # also when rank 0 raises (nothing readable): the others must not wait
    return result


def _complete(paths: Dict[str, Path], options: Dict[str, Any], captions_sha: Optional[str]):
    """The record of a finished run with the same options and captions whose files are all there, or None."""
    try:
        record = json.loads(paths["record"].read_text(encoding="utf-8"))
        if record.get("options") != options or record.get("captions_sha256") != captions_sha:
            return None
        if not all((paths[k].parent / name).is_file() and (paths[k].parent / name).stat().st_size == size
                   for k, (name, size) in record["files"].items()):
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _prepare_stage(stage: Path, options: Dict[str, Any], shapes) -> None:
    """Keep the staging folder of an interrupted run with the same options; otherwise start afresh."""
    manifest = stage / "manifest.json"
    try:
        same = json.loads(manifest.read_text(encoding="utf-8")).get("options") == options
    except (OSError, ValueError, AttributeError):
        same = False
    if same and all(RowFile.matches(stage / f"{k}.npy", *shapes[k]) for k in ARRAYS):
        return
    if stage.exists():
        shutil.rmtree(stage)
    try:
        (stage / "thumbs").mkdir(parents=True)
        for k in ARRAYS:
            RowFile(stage / f"{k}.npy", *shapes[k], create=True).close()
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise DataError(f"{stage}: cannot create the extraction's working files ({exc.strerror or exc})") from None
    atomic_write_text(manifest, json.dumps({"options": options}) + "\n")      # last: the stage is ready


def _finished_blocks(stage: Path, options: Dict[str, Any]) -> Dict[int, List[Tuple[int, str]]]:
    """Blocks recorded by any process of a run with the same options, with their failures."""
    done: Dict[int, List[Tuple[int, str]]] = {}
    for path in sorted(stage.glob("blocks-r*.jsonl")):
        done.update(BlockLog.read(path, options))
    return done


def _run_blocks(detector, selection, listing: ImageList, todo: Sequence[int], block: int, batch_size: int,
                workers: int, files: Dict[str, RowFile], log: BlockLog, stage: Path, thumbnail_side: int,
                bar, show_failures: bool) -> None:
    """Decode the entries of ``todo`` blocks with ``workers`` processes, run the detector on
    batches of ``batch_size`` readable images of one block, write their rows, then log the block."""
    n = len(listing)
    entries = [e for b in todo for e in range(b * block, min(n, (b + 1) * block))]
    if not entries:
        bar.close()
        return
    loader = DataLoader(DecodedEntries(listing, stage / "thumbs", thumbnail_side), batch_size=None,
                        sampler=entries, num_workers=workers, collate_fn=_as_is,
                        prefetch_factor=2 if workers else None)
    pending: List[Tuple[int, torch.Tensor]] = []
    failed: List[Tuple[int, str]] = []
    current = todo[0]

    def run_batch() -> None:
        if pending:
            _write_batch(detector, selection, pending, files)
            bar.update(len(pending))
            pending.clear()

    def finish_block(b: int) -> None:
        run_batch()
        for f in files.values():
            f.sync()                                     # the rows reach the disk before the log says so
        log.mark(b, failed)
        failed.clear()

    for e, image, reason in loader:
        b = e // block
        if b != current:
            finish_block(current)
            current = b
        if image is None:
            failed.append((e, reason))
            bar.update(1)
            if show_failures:
                bar.write(f"vsl extract: skipped {listing.paths[e]}: {reason}", file=sys.stderr)
            continue
        pending.append((e, image))
        if len(pending) == batch_size:
            run_batch()
    finish_block(current)
    bar.close()


def _write_batch(detector, selection, pending: List[Tuple[int, torch.Tensor]], files: Dict[str, RowFile]) -> None:
    """Detector on one batch; its rows (zero-padded to the layout's R regions) to the row files."""
    rows = np.array([e for e, _ in pending], dtype=np.int64)
    found = detector.extract([image.numpy() for _, image in pending], selection=selection)
    b, regions, dim = len(found), files["ims"].shape[1], files["ims"].shape[2]
    counts = torch.tensor([r.features.shape[0] for r in found], dtype=torch.int64)
    feats = torch.zeros(b, regions, dim, dtype=torch.float32)
    boxes = torch.zeros(b, regions, 4, dtype=torch.float32)
    valid = torch.arange(regions)[None, :] < counts[:, None]                    # (b, R)
    feats[valid] = torch.cat([r.features.float().cpu() for r in found])
    boxes[valid] = torch.cat([r.boxes.float().cpu() for r in found])
    sizes = torch.tensor([list(r.image_size) for r in found], dtype=torch.int64)
    files["ims"].write(rows, feats.numpy())
    files["boxes"].write(rows, boxes.numpy())
    files["counts"].write(rows, counts.numpy())
    files["sizes"].write(rows, sizes.numpy())


# ----------------------------------------------------------------------------------------------
# Assembly (rank 0)
# ----------------------------------------------------------------------------------------------
def _assemble(stage: Path, folder: Path, split: str, paths: Dict[str, Path], listing: ImageList,
              options: Dict[str, Any], shapes, caption_lines: Optional[List[str]], per_image: int,
              captions_sha: Optional[str], created: bool, source: PathLike) -> ExtractResult:
    n = len(listing)
    failures = dict(e for fails in _finished_blocks(stage, options).values() for e in fails)
    keep = np.ones(n, dtype=bool)
    keep[list(failures)] = False
    rows = np.flatnonzero(keep)
    failed = [(str(listing.paths[e]), failures[e]) for e in sorted(failures)]
    if len(rows) == 0:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass
        first = f"{failed[0][0]}: {failed[0][1]}" if failed else "no entries"
        raise ImageError(f"{source}: none of its {n} entries could be read as an image (e.g. {first})")

    # Thumbnails: staged as {entry}.png, shown as {row}.png.
    thumbs = folder / f".{paths['thumbs'].name}.{uuid.uuid4().hex[:8]}.tmp"
    thumbs.mkdir()
    for row, e in enumerate(rows.tolist()):
        os.replace(stage / "thumbs" / f"{e}.png", thumbs / f"{row}.png")
    _replace_folder(thumbs, paths["thumbs"])

    for k in ("boxes", "counts", "sizes"):
        with RowFile(stage / f"{k}.npy", *shapes[k], create=False) as f:
            values = f.read(rows)
        atomic_write(paths[k], lambda fh, v=values: np.save(fh, v))
    atomic_write_text(paths["images"], "".join(f"{listing.paths[e]}\n" for e in rows.tolist()))
    atomic_write_text(paths["failed"], "".join(f"{p}\t{why}\n" for p, why in failed))
    if caption_lines is not None:
        kept = [caption_lines[e * per_image + j] for e in rows.tolist() for j in range(per_image)]
        atomic_write_text(paths["caps"], "".join(c + "\n" for c in kept))
    elif "caps" in _previous_files(paths["record"]):
        paths["caps"].unlink(missing_ok=True)        # a previous extraction's captions: not these rows'
    _place_features(stage / "ims.npy", paths["ims"], rows, shapes["ims"])

    written = ["ims", "boxes", "counts", "sizes", "images", "failed"] + (["caps"] if caption_lines else [])
    record = {"format": FORMAT, "options": options, "captions_sha256": captions_sha, "source": str(source),
              "num_images": int(len(rows)), "num_entries": n, "failed": failed,
              "files": {k: [paths[k].name, paths[k].stat().st_size] for k in written},
              "versions": {"torch": torch.__version__, "numpy": np.__version__}, "created": time.time()}
    atomic_write_text(paths["record"], json.dumps(record, indent=2) + "\n")
    shutil.rmtree(stage, ignore_errors=True)
    return ExtractResult(folder, split, int(len(rows)), failed)


def _previous_files(record: Path) -> Dict[str, Any]:
    """The files recorded by the extraction that wrote ``record`` ({} if none)."""
    try:
        return dict(json.loads(record.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _replace_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target`` (renames; the old one, if any, is removed after)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _place_features(staged: Path, target: Path, rows: np.ndarray, shape) -> None:
    """The staged features as the final file: a rename when every entry was read, else a copy of
    the kept rows, :data:`COPY_ROWS` at a time, into a temporary sibling that is then renamed."""
    full, dtype = shape
    if len(rows) == full[0]:
        os.replace(staged, target)
        return
    tmp = temporary_sibling(target)
    try:
        with RowFile(staged, full, dtype, create=False) as src, \
                RowFile(tmp, (len(rows),) + tuple(full[1:]), dtype, create=True) as dst:
            for i in range(0, len(rows), COPY_ROWS):
                j = min(len(rows), i + COPY_ROWS)
                dst.write(np.arange(i, j), src.read(rows[i:j]))
            dst.sync()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
