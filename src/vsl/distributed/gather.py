"""Data-parallel training under torchrun: the loss sees the global batch (differentiable gathers, DDP).

The triplet loss and VSL rank every caption against every image of the batch, so the batch size
changes the objective. With ``N`` ranks holding ``b = B / N`` samples each (rank ``r`` holds the
``r``-th contiguous slice of the global batch), :class:`GlobalBatchScorer` computes on every rank:

1. ``img = encode_images(images)`` ``(b, R, d)`` and ``cap = encode_captions(...)`` ``(b, L, d)``;
2. ``img_all = all_gather_with_grad(img)`` ``(B, R, d)`` in rank order = global batch order;
3. ``block = similarity(img_all, cap)`` ``(B, b)``: only this rank's captions, so each rank
   scores ``1 / N`` of the ``B x B`` pairs;
4. ``scores = gather_score_columns(block)`` ``(B, B)``, identical on every rank and equal to the
   single-process matrix.

The loss is then computed on the full matrix, redundantly and identically on every rank.
Gradient bookkeeping (rank ``r``'s backward only follows its own block):

* every rank holds the same ``dL/dscores``; the column gather's backward keeps rank ``r``'s
  columns only (no communication);
* ``img_all`` is consumed by every rank's block, so the image gather's backward sums
  ``dL/dimg_all`` over the ranks (all-reduce) before keeping the local rows;
* each rank's parameter gradient is then its share of the global-batch gradient, and the true
  gradient is their *sum*. DDP averages by default, so :func:`wrap_model` registers a
  communication hook that sums instead: ``loss.backward()`` leaves exactly the single-process
  gradient of the global batch in every rank's ``.grad`` (no loss rescaling needed).

BatchNorm. The image self-attention's BatchNorms run on ``img_all``: their batch statistics are
those of the global batch and their running statistics are identical on every rank. SAF's
``BatchNorm1d(1)`` normalises each caption over all images (all gathered, so local and exact); its
running statistics are updated caption by caption, so :func:`wrap_model` installs
``SimilarityEncoder.stats_gather`` to gather the per-caption statistics of all ranks in global
order first. Buffers thus stay identical by construction and DDP's per-step buffer broadcast is
switched off.

Dropout draws independent masks per rank: with dropout on, a distributed step is a different
(equally valid) sample of the same objective, not bit-for-bit the single-process step.

The gathers run on a dedicated process group (:attr:`DistInfo.group`): their backward all-reduce
happens while DDP's bucket all-reduces are in flight, and the number of scoring chunks (hence the
autograd graph) can differ between ranks, so sharing DDP's group could interleave the collectives
in different orders on different ranks.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .process import DistInfo, all_gather_concat, gather_concat, gather_sizes, rank_and_world


def _offset(sizes: Sequence[int], rank: int) -> int:
    """Where rank ``rank``'s rows start in the concatenation of pieces of ``sizes``."""
    return int(sum(sizes[:rank]))


class _AllGatherSumGrad(torch.autograd.Function):
    """Rows of every rank, concatenated; backward sums the gradient over ranks, keeps local rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return gather_concat(x, sizes, 0, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's consumers of the gathered rows differ (its own score block), so the
        # gradient of this rank's rows is the sum over ranks. Clone: all_reduce works in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(0, _offset(ctx.sizes, ctx.rank), ctx.sizes[ctx.rank]), None, None


class _GatherColumnsLocalGrad(torch.autograd.Function):
    """Columns of every rank, concatenated; backward keeps the local columns only.

    Valid when everything downstream is computed identically on every rank (the loss on the full
    score matrix): every rank then holds the same gradient of the full matrix, and rank ``r`` is
    responsible for its own columns only.
    """

    @staticmethod
    def forward(ctx, block: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.rank = dist.get_rank(group)
        return gather_concat(block, sizes, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(1, _offset(ctx.sizes, ctx.rank), ctx.sizes[ctx.rank]), None, None


def all_gather_with_grad(x: torch.Tensor, group: Optional["dist.ProcessGroup"] = None,
                         sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``(b_r, ...)`` on each rank -> ``(sum b_r, ...)`` in rank order, differentiable.

    The backward all-reduces (sums) the gradient of the gathered tensor and returns this rank's
    rows: right when each rank's downstream computation is different (its own share of the work).
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = list(sizes) if sizes is not None else gather_sizes(x.size(0), x.device, group)
    return _AllGatherSumGrad.apply(x, sizes, group)


def gather_score_columns(block: torch.Tensor, group: Optional["dist.ProcessGroup"] = None,
                         sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Score blocks ``(B, b_r)`` of every rank -> ``(B, B)``, differentiable.

    The backward keeps this rank's columns without communication; it assumes the loss of the
    full matrix is computed identically on every rank (see the module docstring).
    """
    _, world = rank_and_world(group)
    if world == 1:
        return block
    sizes = list(sizes) if sizes is not None else gather_sizes(block.size(1), block.device, group)
    return _GatherColumnsLocalGrad.apply(block, sizes, group)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
class GlobalBatchScorer(nn.Module):
    """Score matrix of the global batch from this rank's slice of it.

    ``forward(images (b, R, img_dim), captions (b, L), lengths (b,)) -> (B, B)`` with rows = the
    images and columns = the captions of all ranks in rank order (= the single-process matrix).
    This rank computes only its ``(B, b)`` column block. With ``group=None`` (a single process)
    it is ``model(...)``. Wrap it (not the model) in DDP so that DDP sees the forward pass.
    """

    def __init__(self, model: nn.Module, group: Optional["dist.ProcessGroup"] = None):
        super().__init__()
        self.model = model
        self.group = group

    def forward(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = torch.as_tensor(lengths)
        _, world = rank_and_world(self.group)
        if world == 1:
            return self.model(images, captions, lengths)
        sizes = gather_sizes(images.size(0), images.device, self.group)
        img_emb = self.model.encode_images(images)                           # (b, R, d)
        cap_emb = self.model.encode_captions(captions, lengths)              # (b, L, d)
        img_all = all_gather_with_grad(img_emb, self.group, sizes)            # (B, R, d)
        block = self.model.similarity(img_all, cap_emb, lengths)              # (B, b)
        return gather_score_columns(block, self.group, sizes)                 # (B, B)


def install_stats_gather(model: nn.Module, group: Optional["dist.ProcessGroup"] = None) -> None:
    """Make SAF's running BatchNorm statistics see the captions of all ranks, in global order.

    ``(3, b)`` per-caption (mean, var, count) -> ``(3, B)`` (:meth:`VSLModel.set_statistics_gather`).
    """
    def gather(stats: torch.Tensor) -> torch.Tensor:
        return all_gather_concat(stats, group, dim=1)

    model.set_statistics_gather(gather if rank_and_world(group)[1] > 1 else None)


def _sum_allreduce_hook(group, bucket):
    """DDP communication hook: sum (not average) the gradient buckets over ranks.

    Returns a ``torch.futures.Future[torch.Tensor]`` (not annotated: DDP compares the annotation
    object, which postponed annotations turn into a string).

    Each rank's gradient is its share of the global-batch gradient (see the module docstring), so
    the sum is the gradient of one process holding the whole batch.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """The module a training step calls: ``scores = wrapped(images, captions, lengths)`` ``(B, B)``.

    Single process: :class:`GlobalBatchScorer` (i.e. ``model(...)``). Distributed: DDP around it,
    with summed gradients, SAF statistics gathered, and no per-step buffer broadcast (buffers are
    identical on all ranks by construction). DDP broadcasts rank 0's parameters and buffers once
    here, so all ranks start from the same weights. ``model`` must already be on ``info.device``.
    """
    scorer = GlobalBatchScorer(model, info.group)
    if not info.is_distributed:
        return scorer
    install_stats_gather(model, info.group)
    options = dict(
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        # Every parameter gets a gradient each step (SGR's key bias, which cancels in the edge
        # softmax, is kept in the graph with an exact zero gradient), so no unused-parameter search.
        find_unused_parameters=False,
    )
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = False
    else:                                                                     # torch < 2.13
        options["broadcast_buffers"] = False
    ddp = nn.parallel.DistributedDataParallel(scorer, **options)
    ddp.register_comm_hook(dist.group.WORLD, _sum_allreduce_hook)
    return ddp


def unwrap_model(module: nn.Module) -> nn.Module:
    """The :class:`~vsl.models.VSLModel` inside what :func:`wrap_model` returned (for saving)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return module.model if isinstance(module, GlobalBatchScorer) else module


