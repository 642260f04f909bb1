"""Precomputed-feature datasets (SCAN layout), batches with VSL semantic matrices, seeded sampling.

Layout, as distributed::

    DATA/{coco_precomp,f30k_precomp}/{split}_ims.npy    N x 36 x 2048 float32 region features
                                                        (float16 / float64 files are read as float32)
    DATA/{coco_precomp,f30k_precomp}/{split}_caps.txt   one caption per line, 5 per image (or 1)

Features are memory-mapped and read one image at a time (COCO train is 33 GB); captions are kept
as strings and tokenized when a sample is drawn.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, DataError, FitError
from .captions import read_captions
from .vocab import Vocabulary

PathLike = Union[str, os.PathLike]

SPLITS = ("train", "dev", "test", "testall")
EVAL_SPLITS = SPLITS[1:]            # the splits that are scored (train is only trained on)
VALIDATION_CAPTIONS = 5000          # the published code validates on the first 5,000 dev captions
FEATURE_DTYPE = np.dtype("<f4")     # what the models see; files may hold any float width


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def split_files(data_path: PathLike, data_name: str, split: str) -> Tuple[Path, Path]:
    """``(DATA/{data_name}/{split}_ims.npy, DATA/{data_name}/{split}_caps.txt)``."""
    folder = Path(data_path) / data_name
    return folder / f"{split}_ims.npy", folder / f"{split}_caps.txt"


def default_max_captions(split: str, val_all: bool = False) -> Optional[int]:
    """Captions to use from ``split``: the first 5,000 of ``dev`` (as published) unless ``val_all``."""
    return VALIDATION_CAPTIONS if split == "dev" and not val_all else None


def _read_npy_header(path: Path) -> Tuple[tuple, np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data_offset)`` of a ``.npy`` file, without reading its data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            return shape, dtype, fortran_order, f.tell()
    except FileNotFoundError:
        raise DataError(f"{path}: feature file not found (expected an N x regions x dim float32 .npy)") from None
    except (ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{path}: not a .npy array file ({e})") from None


def open_features(path: PathLike) -> np.memmap:
    """Memory-map a ``(N, regions, dim)`` float ``.npy`` read-only, after checking its header and size.

    The map keeps the file's dtype (float32 as distributed; float16 and float64 are accepted too);
    readers convert to float32.
    """
    path = Path(path)
    shape, dtype, fortran_order, offset = _read_npy_header(path)
    if len(shape) != 3:
        raise DataError(f"{path}: expected a rank-3 array (images x regions x dim), got shape {shape}")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise DataError(f"{path}: expected floating-point features (float32, float16 or float64), got dtype {dtype}")
    if fortran_order:
        raise DataError(f"{path}: expected a C-ordered array, got Fortran order")
    if 0 in shape:
        raise DataError(f"{path}: expected at least one image with regions and features, got shape {shape}")
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise DataError(f"{path}: truncated: {actual} bytes, expected {expected} for shape {shape} {dtype}")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def check_finite(features: np.ndarray, path: PathLike, first_image: int = 0,
                 image_ids: Optional[Sequence[int]] = None) -> None:
    """DataError naming the file and image when ``features`` (one image or a batch) hold NaN or inf.

    The images of a batch are ``first_image, first_image + 1, ...``, or ``image_ids`` when the batch
    is not a contiguous run of the file. A NaN feature would otherwise turn a whole row of scores
    into NaN, or stop training with a NaN loss far from its cause.
    """
    finite = np.isfinite(features)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0]) if features.ndim == 3 else 0
        bad = int(image_ids[row]) if image_ids is not None else first_image + row
        raise DataError(f"{path}: image {bad} has non-finite features (NaN or inf)")


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------
class PrecompDataset(Dataset):
    """Captions of one split with the precomputed region features of their images.

    Sample ``i`` is caption ``i`` and image ``i // captions_per_image``. ``max_captions`` keeps the
    first captions only (see :func:`default_max_captions`); ``num_images`` is then the number of images
    those captions describe, while ``images`` stays the whole feature array.
    """

    def __init__(self, data_path: PathLike, data_name: str, split: str, vocab: Vocabulary,
                 max_captions: Optional[int] = None) -> None:
        self.data_name, self.split, self.vocab = data_name, split, vocab
        self.images_path, self.captions_path = split_files(data_path, data_name, split)
        for path in (self.images_path, self.captions_path):
            if not path.is_file():
                raise DataError(f"{path}: missing file of split {split!r} (expected "
                                f"{{data_path}}/{data_name}/{split}_ims.npy and {split}_caps.txt)")
        self._images: Optional[np.memmap] = open_features(self.images_path)
        self._fd: Optional[int] = None
        total_images, self.num_regions, self.img_dim = self._images.shape
        self.captions: List[str] = read_captions(self.captions_path)
        if len(self.captions) == 5 * total_images:
            self.captions_per_image = 5
        elif len(self.captions) == total_images:
            self.captions_per_image = 1
        else:
            raise DataError(f"{self.captions_path}: {len(self.captions)} captions for {total_images} images in "
                            f"{self.images_path.name}; expected {5 * total_images} (5 per image) or {total_images}")
        if max_captions is not None:
            self.captions = self.captions[:max_captions]
        self.num_images = math.ceil(len(self.captions) / self.captions_per_image)
        self.file_dtype = self._images.dtype
        self._image_bytes = self.num_regions * self.img_dim * self.file_dtype.itemsize
        self._data_offset = self._images.offset

    @property
    def images(self) -> np.memmap:
        """All features, ``(N, regions, dim)`` in the file's dtype, memory-mapped read-only."""
        if self._images is None:
            self._images = open_features(self.images_path)
        return self._images

    def __len__(self) -> int:
        return len(self.captions)

    def read_image(self, image_id: int) -> np.ndarray:
        """Features of one image, ``(regions, dim)`` float32, in a fresh array; non-finite values are an error.

        Uses ``pread`` rather than slicing the memmap: pages read through a mapping stay mapped and
        count towards the process' resident memory (7.5 GB after 200 COCO batches), whereas
        ``pread`` copies out of the page cache, which the kernel reclaims as needed.
        """
        if self._fd is None:
            self._fd = os.open(self.images_path, os.O_RDONLY)
        out = np.empty((self.num_regions, self.img_dim), dtype=self.file_dtype)
        view, offset = memoryview(out).cast("B"), self._data_offset + int(image_id) * self._image_bytes
        done = 0
        while done < self._image_bytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise DataError(f"{self.images_path}: truncated while reading image {image_id}")
            done += n
        if out.dtype != FEATURE_DTYPE:
            out = out.astype(FEATURE_DTYPE)
        check_finite(out, self.images_path, int(image_id))
        return out

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(image (R, D) float32, caption ids (L,) int64, caption index, image index)``."""
        index = int(index)
        if not 0 <= index < len(self.captions):
            raise IndexError(f"caption index {index} out of range for {len(self.captions)} captions")
        image_id = index // self.captions_per_image
        image = torch.from_numpy(self.read_image(image_id))
        caption = torch.tensor(self.vocab.encode(self.captions[index]), dtype=torch.int64)
        return image, caption, index, image_id

    # Workers get a copy without the mapping or the file descriptor; both reopen on first use.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        state["_fd"] = None
        return state

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"PrecompDataset({self.data_name}/{self.split}: {len(self)} captions, {self.num_images} images, "
                f"{self.captions_per_image} per image, {self.num_regions}x{self.img_dim})")


def check_fits(config, dataset: "PrecompDataset", vocab: Optional[Vocabulary] = None, *,
               source: PathLike) -> None:
    """The one check that a model configured by ``config`` can read this data.

    Vocabulary size (when ``vocab`` is given), feature dimension and regions per image must match;
    otherwise :class:`FitError` names ``source`` (where the options came from: a checkpoint path,
    or the command line's flags), the data file and both values.
    """
    if vocab is not None and config.vocab_size != len(vocab):
        raise FitError(f"{source}: vocabulary size {config.vocab_size} does not match the "
                       f"vocabulary's {len(vocab)} words")
    for name, have in (("img_dim", dataset.img_dim), ("num_regions", dataset.num_regions)):
        want = getattr(config, name)
        if want != have:
            raise FitError(f"{source}: {name} {want} does not match the {have} of the features "
                           f"in {dataset.images_path}")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One training/evaluation batch of B captions with their images.

    images (B, R, D) float32; captions (B, L) int64 zero-padded (not sorted by length);
    lengths (B,) int64; caption_ids (B,) and image_ids (B,) int64 indices into the split;
    image_semantic / caption_semantic (B, B) float32 or None.
    """

    images: torch.Tensor
    captions: torch.Tensor
    lengths: torch.Tensor
    caption_ids: torch.Tensor
    image_ids: torch.Tensor
    image_semantic: Optional[torch.Tensor] = None
    caption_semantic: Optional[torch.Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: value.to(device, non_blocking=non_blocking) if value is not None else None
                        for name, value in moved.items()})

    def __len__(self) -> int:
        return self.captions.shape[0]


class Collate:
    """Stack samples of :class:`PrecompDataset` into a :class:`Batch`, with the batch's semantic
    matrices when a fitted semantics (:func:`vsl.data.semantics.build_semantics`) is given."""

    def __init__(self, semantics=None, textual: bool = False) -> None:
        if textual and semantics is None:
            raise ConfigError("the textual semantic loss needs a semantic measure (semantics=None given)")
        self.semantics, self.textual = semantics, textual

    def __call__(self, samples: Sequence[Tuple[torch.Tensor, torch.Tensor, int, int]]) -> Batch:
        images, captions, caption_ids, image_ids = zip(*samples)
        caption_ids = torch.tensor(caption_ids, dtype=torch.int64)
        image_ids = torch.tensor(image_ids, dtype=torch.int64)
        # np.stack: a plain memory copy; torch.stack of 37 MB spins intra-op threads, 20-40x slower on
        # a loaded 2-core machine.
        batch = Batch(images=torch.from_numpy(np.stack([image.numpy() for image in images])),
                      captions=pad_sequence(list(captions), batch_first=True, padding_value=0),
                      lengths=torch.tensor([len(c) for c in captions], dtype=torch.int64),
                      caption_ids=caption_ids, image_ids=image_ids)
        if self.semantics is not None:
            per_image = self.semantics.captions_per_image
            if not torch.equal(image_ids, caption_ids // per_image):
                raise ValueError(f"semantics fitted with {per_image} captions per image do not match the "
                                 f"dataset's caption -> image indices")
            ids = caption_ids.numpy()
            batch.image_semantic = torch.from_numpy(self.semantics.image_semantic(ids, per_image))
            if self.textual:
                batch.caption_semantic = torch.from_numpy(self.semantics.caption_semantic(ids))
        return batch


class EpochSampler(Sampler):
    """Batches of caption indices: seeded per epoch, resumable mid-epoch, shardable across ranks.

    The epoch's order is ``torch.randperm(n)`` from a generator seeded with ``seed * 1000003 + epoch``
    (``arange`` without shuffling), cut into global batches of ``batch_size``. Rank ``r`` of
    ``world_size`` takes the r-th of ``world_size`` equal contiguous slices of every global batch, so
    N ranks with B/N samples each see exactly the batches of one process with B. A final partial batch
    is split as evenly as possible; it is dropped with ``drop_last`` or when smaller than ``world_size``
    (every rank must get samples). ``set_epoch(epoch, start_batch)`` skips the global batches already
    done; ``len()`` is the number of batches still to come.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ConfigError(f"need at least one sample and batch_size >= 1, got {num_samples} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.total_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.total_batches}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    @property
    def total_batches(self) -> int:
        """Global batches in one whole epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + int(rest > 0 and not self.drop_last and rest >= self.world_size)

    def order(self) -> torch.Tensor:
        """This epoch's permutation of all sample indices."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order()
        share = self.batch_size // self.world_size
        for b in range(self.start_batch, self.total_batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(batch) == self.batch_size:
                yield batch[self.rank * share:(self.rank + 1) * share].tolist()
            else:
                yield torch.tensor_split(batch, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        return self.total_batches - self.start_batch


def make_loader(dataset: PrecompDataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                workers: int = 0, semantics=None, textual: bool = False, rank: int = 0, world_size: int = 1,
                start_batch: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader of :class:`Batch` over ``dataset`` with an :class:`EpochSampler` (reach it as
    ``loader.batch_sampler`` to ``set_epoch`` for the next epoch)."""
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, rank=rank,
                           world_size=world_size, drop_last=drop_last)
    sampler.set_epoch(epoch, start_batch)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(semantics, textual),
                      num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available())


def companion_path(features: Union[str, os.PathLike], suffix: str) -> Path:
    """What lies beside a features file ``X_ims.npy`` under ``suffix``: ``X_boxes.npy``, ``X_thumbs`` ...
    (for a file not named ``*_ims.npy``, its stem plus ``suffix``)."""
    path = Path(features)
    stem = path.name[:-len("_ims.npy")] if path.name.endswith("_ims.npy") else path.stem
    return path.with_name(stem + suffix)
