"""What an index is built from: a split (features + captions) or a folder of feature files.

A split is the SCAN layout (``DATA/{data_name}/{split}_ims.npy`` and ``_caps.txt``). A pure image
gallery is a folder of ``.npy`` files, each ``(N_f, regions, dim)`` like a split's features (or one
such file), with no captions; its images are numbered across the files in file-name order.
Features are memory-mapped and read a block at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from ..data import check_finite, open_features
from ..data.precomp import FEATURE_DTYPE
from ..errors import DataError

PathLike = Union[str, os.PathLike]


@dataclass
class Gallery:
    """Images as one or more memory-mapped feature arrays, and their captions (maybe none).

    ``captions[cpi * i : cpi * (i + 1)]`` describe image ``i``; ``captions_per_image`` is 0 for a
    pure image gallery.
    """

    arrays: List[np.ndarray]
    sources: List[str]
    captions: List[str] = field(default_factory=list)
    captions_per_image: int = 0
    num_images: Optional[int] = None       # fewer than the arrays hold (a split's max_captions)

    def __post_init__(self) -> None:
        shapes = {a.shape[1:] for a in self.arrays}
        if len(shapes) != 1:
            raise DataError(f"{self.sources[0]}: feature files differ in regions x dim "
                            f"({', '.join(f'{s}: {a.shape[1:]}' for s, a in zip(self.sources, self.arrays))})")
        self._starts = np.cumsum([0] + [len(a) for a in self.arrays])
        if self.num_images is None:
            self.num_images = int(self._starts[-1])

    @property
    def num_regions(self) -> int:
        return int(self.arrays[0].shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.arrays[0].shape[2])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images ``[start, stop)`` as a fresh float32 ``(stop - start, R, D)`` array; NaN/inf is a DataError."""
        parts = []
        for f, array in enumerate(self.arrays):
            lo, hi = max(start, int(self._starts[f])), min(stop, int(self._starts[f + 1]))
            if lo < hi:
                part = np.array(array[lo - self._starts[f]:hi - self._starts[f]], dtype=FEATURE_DTYPE)
                check_finite(part, self.sources[f], int(lo - self._starts[f]))
                parts.append(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def split_gallery(dataset) -> Gallery:
    """The images and captions of a :class:`vsl.data.PrecompDataset`."""
    return Gallery([dataset.images], [str(dataset.images_path)], list(dataset.captions),
                   dataset.captions_per_image, dataset.num_images)


def feature_gallery(path: PathLike) -> Gallery:
    """A pure image gallery from a folder of ``.npy`` feature files (or one file)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
        if not files:
            raise DataError(f"{path}: no .npy feature files in this folder (expected N x regions x dim arrays)")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such folder or .npy file of image features")
    return Gallery([open_features(p) for p in files], [str(p) for p in files])
