"""Scoring all pairs of an encoded split: the step after :func:`vsl.runtime.encode_split` in evaluation and validation.

* :func:`vsl.runtime.encode_split` (re-exported here) runs the image encoder over the split's
  distinct images (not once per caption, as the published ``encode_data`` does) and the text
  encoder over its captions.
* :func:`score` scores all pairs in blocks of images (:func:`vsl.evaluation.sharding.sharded_similarity`),
  with a progress bar over pairs; under torchrun the blocks are split over the processes, and the
  score matrix is bit-for-bit the same for any number of processes.
"""
from __future__ import annotations

import torch

from ..models import VSLModel
from ..precision import precision_context
from ..runtime import Embeddings, encode_split, pad_token_ids  # noqa: F401  (re-exported)
from .sharding import sharded_similarity


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
