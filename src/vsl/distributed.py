"""Data-parallel training and sharded evaluation with ``torch.distributed`` (torchrun, DDP).

Launch with ``torchrun --nproc_per_node N -m vsl train ...``: every process reads the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) in
:func:`setup_distributed`, which joins the process group (NCCL on GPUs, Gloo on CPUs).

Training: the loss sees the global batch
-----------------------------------------
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

Evaluation: image shards
------------------------
:func:`sharded_similarity` cuts the images into fixed blocks of ``block_images`` (independent of
the world size); rank ``r`` scores a contiguous run of blocks against all captions and the rows
are all-gathered. A single process scores the same blocks one after the other, so every block is
computed by the same call with the same shapes and the result is bit-for-bit identical for any
number of ranks (scoring a different set of images at once changes the chunking, and with it the
last bits of the floating-point arithmetic).
"""
from __future__ import annotations

import inspect
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError
from .similarity import default_chunk_elements

#: Images per evaluation block: the unit of work of :func:`sharded_similarity`. It must not depend
#: on the world size, so that any number of ranks reproduces the single-process scores exactly.
EVAL_IMAGE_BLOCK = 128

#: Environment variables that torchrun sets for every process.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and gather group.

    A single process is ``DistInfo()`` with ``world_size == 1`` and no process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    group: Optional["dist.ProcessGroup"] = None   # dedicated group for the embedding/score gathers

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and tables."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def free_loopback_port() -> int:
    """A free TCP port on 127.0.0.1, for MASTER_PORT of single-machine process groups (tests, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_torchrun() -> bool:
    """True when the torchrun environment asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available, else ``cpu``; otherwise ``torch.device(device)``, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def setup_distributed(device: str = "auto", backend: Optional[str] = None,
                      timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the torchrun environment, or describe a single process.

    Under torchrun with ``WORLD_SIZE > 1``: GPU runs use ``cuda:LOCAL_RANK`` and NCCL; CPU runs
    (``device="cpu"`` or no GPU) use Gloo. Without torchrun (or ``WORLD_SIZE == 1``) nothing is
    initialised and ``DistInfo(device=resolve_device(device))`` is returned.
    """
    if not launched_by_torchrun():
        return DistInfo(device=resolve_device(device))
    missing = [name for name in TORCHRUN_ENV if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                          "launch with torchrun (e.g. torchrun --nproc_per_node 2 -m vsl train ...)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                              "use --nproc_per_node <= the number of GPUs")
        # One GPU per process: torchrun's LOCAL_RANK picks it (an explicit index is overridden).
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    elif wanted.type != "cpu":
        raise ConfigError(f"--device {device}: distributed runs support cpu or cuda devices")
    backend = backend or ("nccl" if wanted.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    group = dist.new_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=wanted,
                    backend=backend, group=group)


def cleanup() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the job (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_and_world(group: Optional["dist.ProcessGroup"] = None) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` for ``group=None``.

    Throughout this module ``group=None`` means *this process alone* (no communication), not the
    default group as in ``torch.distributed``: a single-process scorer stays local even inside
    an initialised process group. Pass :attr:`DistInfo.group` to distribute.
    """
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------------------------
# Gathers
# ----------------------------------------------------------------------------------------------
def gather_sizes(size: int, device: torch.device, group: Optional["dist.ProcessGroup"] = None) -> List[int]:
    """Every rank's ``size`` (e.g. its local batch size), in rank order."""
    _, world = rank_and_world(group)
    if world == 1:
        return [int(size)]
    local = torch.tensor([int(size)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _gather_cat(x: torch.Tensor, sizes: Sequence[int], dim: int,
                group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
    """Concatenate along ``dim`` every rank's ``x`` (``sizes[r]`` long on rank ``r``), in rank order.

    Collectives need equal shapes: shorter pieces are zero-padded to the longest, then trimmed.
    """
    longest = max(sizes)
    x = x.contiguous()
    if x.size(dim) < longest:
        pad = list(x.shape)
        pad[dim] = longest - x.size(dim)
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def _offset(sizes: Sequence[int], rank: int) -> int:
    return int(sum(sizes[:rank]))


def all_gather_concat(x: torch.Tensor, group: Optional["dist.ProcessGroup"] = None, dim: int = 0,
                      sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along ``dim`` in rank order, without gradient.

    E.g. the global batch's caption ids ``(B,)`` from the local ``(b,)``, to build the global
    semantic matrices. Sizes along ``dim`` may differ between ranks.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = list(sizes) if sizes is not None else gather_sizes(x.size(dim), x.device, group)
    with torch.no_grad():
        return _gather_cat(x.detach(), sizes, dim, group)


def all_gather_objects(obj, group: Optional["dist.ProcessGroup"] = None) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` for ``group=None``), e.g. RNG states."""
    _, world = rank_and_world(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


class _AllGatherSumGrad(torch.autograd.Function):
    """Rows of every rank, concatenated; backward sums the gradient over ranks, keeps local rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_cat(x, sizes, 0, group)

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
        return _gather_cat(block, sizes, 1, group)

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

    Sets ``model.sim_enc.stats_gather``: ``(3, b)`` per-caption (mean, var, count) -> ``(3, B)``.
    """
    def gather(stats: torch.Tensor) -> torch.Tensor:
        return all_gather_concat(stats, group, dim=1)

    model.sim_enc.stats_gather = gather if rank_and_world(group)[1] > 1 else None


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
    """The :class:`~vsl.model.VSLModel` inside what :func:`wrap_model` returned (for saving)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return module.model if isinstance(module, GlobalBatchScorer) else module


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
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
    model's ``config.score_chunk``, else the automatic budget, taken once per call (fixed on CPU;
    on a GPU it follows the free memory, so set ``score_chunk`` to compare runs bit for bit).
    ``progress(num_pairs)`` counts this rank's pairs (``(stop - start) * m`` in all).
    ``group=None``: this process scores all blocks itself. The model must be in eval mode.
    """
    if model.training:
        raise ValueError("sharded_similarity needs model.eval(): training-mode SAF statistics span all images")
    if chunk_elements is None:
        config = getattr(model, "config", None)
        chunk_elements = (getattr(config, "score_chunk", None)
                          or default_chunk_elements(img_emb.device, img_emb.size(-1)))
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
    return _gather_cat(local, sizes, 0, group)
