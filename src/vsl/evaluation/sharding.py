"""Evaluation split over the processes of a torchrun job: image shards of fixed blocks.

:func:`sharded_similarity` cuts the images into fixed blocks of ``block_images`` (independent of
the world size); rank ``r`` scores a contiguous run of blocks against all captions and the rows
are all-gathered. A single process scores the same blocks one after the other, so every block is
computed by the same call with the same shapes and the result is bit-for-bit identical for any
number of ranks (scoring a different set of images at once changes the chunking, and with it the
last bits of the floating-point arithmetic).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import gather_concat, rank_and_world

#: Images per evaluation block: the unit of work of :func:`sharded_similarity`. It must not depend
#: on the world size, so that any number of ranks reproduces the single-process scores exactly.
EVAL_IMAGE_BLOCK = 128


def image_shard(num_images: int, rank: int, world_size: int,
                block_images: int = EVAL_IMAGE_BLOCK) -> Tuple[int, int]:
    """Rows ``[start, stop)`` that ``rank`` scores: a contiguous run of whole blocks.

    Block ``k`` is images ``[k * block_images, (k + 1) * block_images)``; rank ``r`` takes blocks
    ``[floor(K r / N), floor(K (r + 1) / N))`` of the ``K`` blocks, so shards are disjoint, cover
    every image, and differ by at most one block.
    """
    if block_images < 1:
        raise ValueError(f"block_images must be positive, got {block_images}")
    blocks = -(-num_images // block_images)
    first, last = blocks * rank // world_size, blocks * (rank + 1) // world_size
    return min(num_images, first * block_images), min(num_images, last * block_images)


@torch.no_grad()
def sharded_similarity(model: nn.Module, img_emb: torch.Tensor, cap_emb: torch.Tensor,
                       lengths: torch.Tensor, *, block_images: int = EVAL_IMAGE_BLOCK,
                       chunk_elements: Optional[int] = None,
                       progress: Optional[Callable[[int], None]] = None,
                       group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """All-pairs scores ``(n, m)`` of ``img_emb (n, R, d)`` x ``cap_emb (m, L, d)``, split by images.

    Every rank passes the same embeddings; rank ``r`` scores the image rows of
    :func:`image_shard` against all captions, block by block, and the rows are all-gathered, so
    every rank returns the full matrix. The result does not depend on the number of ranks, bit for
    bit, given the same kind of device and the same chunk budget: ``chunk_elements``, else the
    model's :meth:`~vsl.models.VSLModel.chunk_budget`, taken once per call (fixed on CPU;
    on a GPU it follows the free memory, so set ``score_chunk`` to compare runs bit for bit).
    ``progress(num_pairs)`` counts this rank's pairs (``(stop - start) * m`` in all).
    ``group=None``: this process scores all blocks itself. The model must be in eval mode.
    """
    if model.training:
        raise ValueError("sharded_similarity needs model.eval(): training-mode SAF statistics span all images")
    if chunk_elements is None:
        chunk_elements = model.chunk_budget()
    rank, world = rank_and_world(group)
    n, m = img_emb.size(0), cap_emb.size(0)
    start, stop = image_shard(n, rank, world, block_images)
    rows = [model.similarity(img_emb[i:min(i + block_images, stop)], cap_emb, lengths,
                             chunk_elements=chunk_elements, progress=progress)
            for i in range(start, stop, block_images)]
    local = torch.cat(rows, dim=0) if rows else img_emb.new_zeros(0, m)
    if world == 1:
        return local
    sizes = [stop_r - start_r for start_r, stop_r in
             (image_shard(n, r, world, block_images) for r in range(world))]
    return gather_concat(local, sizes, 0, group)

