"""Encoding a split once and scoring all its pairs: the shared first steps of evaluation, validation and indexing.

* :func:`encode_split` runs the image encoder over the split's distinct images (not once per
  caption, as the published ``encode_data`` does) and the text encoder over its captions.
* :func:`score` scores all pairs in blocks of images (:func:`vsl.evaluation.sharding.sharded_similarity`),
  with a progress bar over pairs; under torchrun the blocks are split over the processes, and the
  score matrix is bit-for-bit the same for any number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

from ..data.precomp import check_finite
from ..logs import progress_bar
from ..models import VSLModel
from ..precision import precision_context
from .sharding import sharded_similarity


@dataclass
class Embeddings:
    """A split encoded by one model.

    images: ``(n, R, d)``; captions: ``(m, L, d)`` zero-padded; lengths: ``(m,)`` int64 (CPU).
    """

    images: torch.Tensor
    captions: torch.Tensor
    lengths: torch.Tensor

    def subset(self, image_slice: slice, caption_slice: slice) -> "Embeddings":
        lengths = self.lengths[caption_slice]
        max_len = int(lengths.max()) if lengths.numel() else 1
        return Embeddings(self.images[image_slice], self.captions[caption_slice, :max_len], lengths)


def pad_token_ids(token_ids: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``(m, L)`` int64 ids and ``(m,)`` lengths of a list of id lists."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
    if (lengths == 0).any():
        raise ValueError("empty token list")
    flat = torch.tensor([i for t in token_ids for i in t], dtype=torch.int64)
    ids = torch.zeros(len(token_ids), int(lengths.max()), dtype=torch.int64)
    ids[torch.arange(ids.size(1)) < lengths.unsqueeze(1)] = flat     # row-major fill = caption order
    return ids, lengths


@torch.inference_mode()
def encode_split(model: VSLModel, images: np.ndarray, token_ids: Sequence[Sequence[int]], *,
                 batch_size: int = 128, progress: bool = True, precision: str = "fp32",
                 desc: str = "encode", source: str = "image features") -> Embeddings:
    """Encode ``images`` ``(n, R, D)`` (a memmap is read batch by batch) and captions (lists of ids).

    ``source`` names the features in errors (non-finite values are a :class:`DataError`).

    Returns :class:`Embeddings` on the model's device, in the order given.
    """
    device = model.device
    ids, lengths = pad_token_ids(token_ids)
    n, m = len(images), len(token_ids)
    bar = progress_bar(n + m, desc, enabled=progress, unit="item", unit_scale=True)
    with precision_context(precision, device):
        img_parts = []
        for i in range(0, n, batch_size):
            # A copy: memmaps are read-only, and only this batch is read from disk.
            array = np.array(images[i:i + batch_size], dtype=np.float32)
            check_finite(array, source, i)
            batch = torch.from_numpy(array)
            img_parts.append(model.encode_images(batch.to(device)).float())
            bar.update(len(batch))
        cap_emb = None
        for j in range(0, m, batch_size):
            lens = lengths[j:j + batch_size]
            emb = model.encode_captions(ids[j:j + batch_size, :int(lens.max())].to(device), lens).float()
            if cap_emb is None:
                cap_emb = emb.new_zeros(m, ids.size(1), emb.size(-1))
            cap_emb[j:j + len(lens), :emb.size(1)] = emb
            bar.update(len(lens))
    bar.close()
    img_emb = torch.cat(img_parts) if img_parts else torch.zeros(0, device=device)
    return Embeddings(img_emb, cap_emb, lengths)


@torch.inference_mode()
def score(model: VSLModel, emb: Embeddings, *, bar=None, precision: str = "fp32", group=None) -> torch.Tensor:
    """All-pairs scores ``(n, m)`` float32 on the CPU; ``bar`` (a tqdm) advances by pairs scored.

    ``group``: the process group of a torchrun run (:attr:`vsl.distributed.DistInfo.group`): each
    process scores its share of the images and every process gets the whole matrix. ``None``: this
    process scores everything, in the same image blocks (so the result is identical).
    """
    progress = bar.update if bar is not None else None
    with precision_context(precision, model.device):
        sims = sharded_similarity(model, emb.images, emb.captions, emb.lengths.to(model.device),
                                  progress=progress, group=group)
    return sims.float().cpu()
