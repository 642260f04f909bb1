"""Shared pieces of the benchmarks: COCO-like caption lengths, FLOP counts, timing, tables."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence

import numpy as np
import torch


def coco_like_lengths(m: int, seed: int = 0, mean: float = 12.5, low: int = 6, high: int = 50) -> torch.Tensor:
    """Caption lengths (words incl. <start>/<end>) like MS-COCO's: ``low + Poisson(mean - low)``, clipped.

    COCO captions have 10.5 words on average, so 12.5 tokens with <start>/<end>; the shortest have ~8.
    """
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.clip(low + rng.poisson(mean - low, size=m), low, high)).long()


def flops_per_pair_published(module_name: str, length: float, d: int, s: int, regions: int = 36,
                             sgr_step: int = 3) -> float:
    """Multiply-add FLOPs (2 per MAC) of one image-caption pair in the published per-caption loop.

    attention logits + context (2 R L d each), local alignment linear (L d s), global linear (d s),
    SGR: per step query, key and update linears (3 N s^2) and two N x N x s products, N = L + 1;
    SAF: one linear (N s) and the weighted sum (N s).
    """
    n_nodes = length + 1
    flops = 2 * (2 * regions * length * d) + 2 * length * d * s + 2 * d * s
    if module_name == "SGR":
        flops += sgr_step * (2 * 3 * n_nodes * s * s + 2 * 2 * n_nodes * n_nodes * s)
    else:
        flops += 2 * 2 * n_nodes * s
    return float(flops + 2 * s)


def flops_per_pair_batched(module_name: str, length: float, d: int, s: int, regions: int = 36,
                           sgr_step: int = 3) -> float:
    """FLOPs that :class:`vsl.models.similarity.SimilarityEncoder` executes per pair.

    SGR: folded query/key (one N s^2 projection instead of two) and a last step that only updates
    node 0 (2 s^2 + 2 N s instead of 3 N s^2 + 2 N^2 s).
    """
    n_nodes = length + 1
    flops = 2 * (2 * regions * length * d) + 2 * length * d * s + 2 * d * s
    if module_name == "SGR":
        flops += (sgr_step - 1) * (2 * 2 * n_nodes * s * s + 2 * 2 * n_nodes * n_nodes * s)
        flops += 2 * 2 * s * s + 2 * 2 * n_nodes * s
    else:
        flops += 2 * 2 * n_nodes * s
    return float(flops + 2 * s)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of a ``size^3`` float32 matrix product on ``device``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = time_it(lambda: a @ b, repeats=repeats, device=device)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def time_it(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device=None) -> List[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` calls, synchronising CUDA around each."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and torch.device(device).type == "cuda" \
        else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x):
        return f"{x:,.3g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
