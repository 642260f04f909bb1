"""Shared pieces of the benchmarks: COCO-like caption lengths, FLOP counts, timing, tables."""
from __future__ import annotations

import time
from typing import Callable, List, Sequence

import numpy as np
import torch

from vsl.precision import precision_context


def coco_like_lengths(m: int, seed: int = 0, mean: float = 13.0, low: int = 8, high: int = 50) -> torch.Tensor:
    """Caption lengths ``(m,)`` int64 (words incl. ``<start>``/``<end>``) like MS-COCO's.

    ``low + Poisson(mean - low)`` clipped to ``[6, high]``: by default mean 13.0, sd 2.2. The 25,000
    MS-COCO test captions measure mean 13.3, sd 2.6, range 8-52 (simple word/punctuation split plus
    the two markers); the Poisson has a lighter right tail, which matters little because the scorer
    pads each chunk only to its own longest caption.
    """
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.clip(low + rng.poisson(mean - low, size=m), 6, high)).long()


def flops_per_pair(config, mean_len: float, published: bool = True) -> float:
    """Floating-point operations (2 per multiply-add) to score one image-caption pair.

    Counts the products whose cost grows with ``images x captions`` (per-image and per-caption work,
    the encoders and self-attention pooling, is amortised and left out). ``L = mean_len`` words,
    ``R`` regions, ``d`` embed size, ``s`` sim dim, ``N = L + 1`` alignment nodes:

    * text-to-image attention: logits ``R L d`` + attended context ``R L d``;
    * local alignments ``W_loc``: ``L d s``; global alignment ``W_glo``: ``d s``;
    * SGR, published (``published=True``), per step: query, key and update projections ``3 N s^2``,
      edges ``N^2 s`` and their product with the nodes ``N^2 s``;
      batched (``published=False``): query and key folded into one ``s x s`` projection
      (``2 N s^2 + 2 N^2 s``) for all but the last step, which computes node 0 only
      (``2 s^2 + 2 N s``);
    * SAF: gate ``N s`` + pooling ``N s``;
    * final score ``s``.

    Published sizes (R=36, d=1024, s=256, 3 SGR steps) with L = 13: SGR about 26 MFLOP
    (published) / 16 MFLOP (batched); SAF about 9.4 MFLOP either way.
    """
    L, R, d, s = float(mean_len), config.num_regions, config.embed_size, config.sim_dim
    N = L + 1
    macs = 2 * R * L * d + L * d * s + d * s + s
    if config.module_name == "SGR":
        steps = config.sgr_step
        if published:
            macs += steps * (3 * N * s * s + 2 * N * N * s)
        else:
            macs += (steps - 1) * (2 * N * s * s + 2 * N * N * s) + (2 * s * s + 2 * N * s)
    else:
        macs += 2 * N * s
    return 2.0 * macs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def matmul_rate(device: torch.device, precision: str, size: int, min_seconds: float = 0.5) -> float:
    """FLOP/s of a ``size x size`` matrix product in ``precision`` (bf16: bfloat16 inputs)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    with precision_context("tf32" if precision == "tf32" else "fp32", device):
        a @ b                                                   # warm-up (cuBLAS handle, heuristics)
        sync(device)
        reps, seconds = 1, 0.0
        while True:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            seconds = time.perf_counter() - t0
            if seconds >= min_seconds or reps >= 1 << 12:
                break
            reps *= 2
    return 2.0 * size ** 3 * reps / seconds


def time_it(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device=None) -> List[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` calls, synchronising CUDA around each."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x):
        return f"{x:,.3g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
