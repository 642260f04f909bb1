"""The process group of a torchrun job and the collectives the programs share (no gradients).

Launch with ``torchrun --nproc_per_node N -m vsl train ...``: every process reads the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) in
:func:`setup_distributed`, which joins the process group (NCCL on GPUs, Gloo on CPUs).

``group=None`` everywhere means *this process alone*: every function here then does no
communication, so single-process code paths are the same functions.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import ConfigError

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


def gather_concat(x: torch.Tensor, sizes: Sequence[int], dim: int,
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
        return gather_concat(x.detach(), sizes, dim, group)


def all_gather_objects(obj, group: Optional["dist.ProcessGroup"] = None) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` for ``group=None``), e.g. RNG states."""
    _, world = rank_and_world(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


