"""Retrieval metrics and evaluation protocols of the SCAN/SGRAF evaluation: R@K, median and mean
rank, rsum; ``coco1k`` (mean over 5 folds), ``coco5k`` and ``full`` (the whole matrix).

``sims`` is an (N, cpi * N) image x caption similarity matrix in which captions
``cpi * i .. cpi * i + cpi - 1`` belong to image i (cpi = captions per image, 5 for COCO/Flickr30K).

Ranks are 0-based positions in a descending ``np.argsort`` of each row, exactly as the published
per-row loop computes them: here one 2-D ``np.argsort(..., axis=1)`` runs the same per-row sort, so
ties are broken identically. Rows are processed in chunks so that a 5,000 x 25,000 matrix needs
only tens of MB beyond the matrix itself.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import numpy as np
from tqdm import tqdm

from .errors import ConfigError

#: Elements of sorted indices (int64) held at once per chunk: 32 MB.
CHUNK_ELEMENTS = 1 << 22

METRIC_NAMES = ("r1", "r5", "r10", "medr", "meanr")
PROTOCOLS = ("coco1k", "coco5k", "full")
COCO1K_FOLDS = 5
COCO1K_FOLD_IMAGES = 1000

Summary = Tuple[float, float, float, float, float]


def _as_numpy(sims) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor (no copy where possible, dtype kept)."""
    if hasattr(sims, "detach"):  # torch.Tensor, without importing torch here
        sims = sims.detach().cpu()
        if not sims.is_floating_point() or str(sims.dtype) == "torch.bfloat16":
            sims = sims.float()
        sims = sims.numpy()
    return np.asarray(sims)


def _check_shape(sims: np.ndarray, captions_per_image: int) -> Tuple[int, int]:
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be positive, got {captions_per_image}")
    if sims.ndim != 2 or sims.shape[1] != captions_per_image * sims.shape[0] or sims.shape[0] == 0:
        raise ConfigError(f"similarity matrix has shape {sims.shape}; expected (N, {captions_per_image}N) "
                          f"images x captions with captions_per_image={captions_per_image}")
    return sims.shape


def _chunks(rows: int, cols: int, progress: bool, desc: str) -> Iterable[Tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    starts = range(0, rows, step)
    for lo in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        yield lo, min(rows, lo + step)


def recall_at_k(ranks, ks: Iterable[int] = (1, 5, 10)) -> tuple:
    """Percentage of queries whose 0-based rank is below K, for each K in ``ks``."""
    ranks = np.asarray(ranks)
    return tuple(100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks)


def _summary(ranks: np.ndarray) -> Summary:
    """(R@1, R@5, R@10, medr, meanr) with the published conventions (1-based medr/meanr)."""
    ranks = ranks.astype(np.float64)
    r1, r5, r10 = recall_at_k(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return float(r1), float(r5), float(r10), float(medr), float(meanr)


def i2t(sims, captions_per_image: int = 5, *, progress: bool = False
        ) -> Tuple[Summary, Tuple[np.ndarray, np.ndarray]]:
    """Image-to-text retrieval (caption search with each image as the query).

    Args:
        sims: (N, cpi * N) numpy array or torch tensor.
        captions_per_image: cpi.

    Returns:
        ``(r1, r5, r10, medr, meanr), (ranks, top1)``: ranks (N,) int64, the best 0-based position
        of the image's own captions; top1 (N,) int64, the index of the top-ranked caption.
    """
    sims = _as_numpy(sims)
    n_images, n_captions = _check_shape(sims, captions_per_image)
    ranks = np.empty(n_images, dtype=np.int64)
    top1 = np.empty(n_images, dtype=np.int64)
    for lo, hi in _chunks(n_images, n_captions, progress, "i2t"):
        order = np.argsort(sims[lo:hi], axis=1)[:, ::-1]          # captions, best first
        own = order // captions_per_image == np.arange(lo, hi)[:, None]
        ranks[lo:hi] = own.argmax(axis=1)                          # first own caption
        top1[lo:hi] = order[:, 0]
    return _summary(ranks), (ranks, top1)


def t2i(sims, captions_per_image: int = 5, *, progress: bool = False
        ) -> Tuple[Summary, Tuple[np.ndarray, np.ndarray]]:
    """Text-to-image retrieval (image search with each caption as the query).

    Args:
        sims: (N, cpi * N) numpy array or torch tensor.
        captions_per_image: cpi.

    Returns:
        ``(r1, r5, r10, medr, meanr), (ranks, top1)``: ranks (cpi * N,) int64, the 0-based position
        of the caption's own image; top1 (cpi * N,) int64, the index of the top-ranked image.
    """
    sims = _as_numpy(sims)
    n_images, n_captions = _check_shape(sims, captions_per_image)
    ranks = np.empty(n_captions, dtype=np.int64)
    top1 = np.empty(n_captions, dtype=np.int64)
    for lo, hi in _chunks(n_captions, n_images, progress, "t2i"):
        order = np.argsort(sims[:, lo:hi].T, axis=1)[:, ::-1]     # images, best first
        own = order == (np.arange(lo, hi) // captions_per_image)[:, None]
        ranks[lo:hi] = own.argmax(axis=1)
        top1[lo:hi] = order[:, 0]
    return _summary(ranks), (ranks, top1)


def _as_dict(summary: Summary) -> Dict[str, float]:
    return dict(zip(METRIC_NAMES, summary))


def retrieval_metrics(sims, captions_per_image: int = 5, *, progress: bool = False) -> dict:
    """``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum": R@1+R@5+R@10 of both}``."""
    i2t_summary, _ = i2t(sims, captions_per_image, progress=progress)
    t2i_summary, _ = t2i(sims, captions_per_image, progress=progress)
    rsum = sum(i2t_summary[:3]) + sum(t2i_summary[:3])
    return {"i2t": _as_dict(i2t_summary), "t2i": _as_dict(t2i_summary), "rsum": float(rsum)}


def fold_slices(protocol: str, num_images: int, captions_per_image: int,
                full_matrix: bool = False) -> List[Tuple[slice, slice]]:
    """The (image, caption) blocks a protocol scores: the 5 diagonal folds for ``coco1k``, else one.

    ``coco1k``: the 5,000 COCO test images in 5 folds of 1,000 (fold f: images
    [1000f, 1000f + 1000), captions [1000 cpi f, 1000 cpi (f + 1))). With ``full_matrix`` the whole
    matrix is one block (the folds are then cut from it by :func:`evaluate_protocol`).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be positive, got {captions_per_image}")
    if protocol == "coco1k":
        expected = COCO1K_FOLDS * COCO1K_FOLD_IMAGES
        if num_images != expected:
            raise ConfigError(f"protocol coco1k needs the {expected} images of COCO testall, "
                              f"this split has {num_images}; use --protocol coco5k/full for other splits")
        if not full_matrix:
            k = captions_per_image
            return [(slice(f * COCO1K_FOLD_IMAGES, (f + 1) * COCO1K_FOLD_IMAGES),
                     slice(f * COCO1K_FOLD_IMAGES * k, (f + 1) * COCO1K_FOLD_IMAGES * k))
                    for f in range(COCO1K_FOLDS)]
    return [(slice(0, num_images), slice(0, num_images * captions_per_image))]


def mean_over_folds(folds: List[dict]) -> dict:
    """The published 1K summary: every metric (R@K, medr, meanr) and rsum averaged over the folds."""
    table = np.array([[f["i2t"][m] for m in METRIC_NAMES] + [f["t2i"][m] for m in METRIC_NAMES] + [f["rsum"]]
                      for f in folds]).mean(axis=0)
    n = len(METRIC_NAMES)
    return {"i2t": _as_dict(tuple(float(v) for v in table[:n])),
            "t2i": _as_dict(tuple(float(v) for v in table[n:2 * n])),
            "rsum": float(table[-1]), "folds": folds}


def protocol_result(blocks: List, protocol: str, captions_per_image: int = 5, *, progress: bool = False) -> dict:
    """Protocol metrics from the blocks of :func:`fold_slices`, scored (one matrix or the 5 folds)."""
    if len(blocks) == 1:
        return evaluate_protocol(blocks[0], protocol, captions_per_image, progress=progress)
    folds = [retrieval_metrics(b, captions_per_image) for b in
             tqdm(blocks, desc=f"{protocol} folds", disable=not progress, leave=False)]
    return mean_over_folds(folds)


def protocol_ranks(blocks: List, protocol: str, captions_per_image: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """Every query's 0-based rank under a protocol, from the blocks of :func:`fold_slices`.

    Returns ``(i2t, t2i)`` in split order: (N,) int64, the rank of each image's best own caption,
    and (cpi * N,) int64, the rank of each caption's image; under ``coco1k`` ranks are within each
    fold of 1,000 images (whether the 5 folds or the full matrix were scored).
    """
    if protocol == "coco1k" and len(blocks) == 1:       # the full matrix: cut it into the folds
        sims = _as_numpy(blocks[0])
        blocks = [sims[i, c] for i, c in fold_slices(protocol, sims.shape[0], captions_per_image)]
    i2t_ranks = [i2t(b, captions_per_image)[1][0] for b in blocks]
    t2i_ranks = [t2i(b, captions_per_image)[1][0] for b in blocks]
    return np.concatenate(i2t_ranks), np.concatenate(t2i_ranks)


def evaluate_protocol(sims, protocol: str, captions_per_image: int = 5, *, progress: bool = False) -> dict:
    """Metrics under a named evaluation protocol, from the full ``(N, cpi N)`` score matrix.

    ``"coco1k"``: the folds of :func:`fold_slices`; every metric (medr included) and rsum are
    averaged over folds as published; ``"folds"`` lists the per-fold results.
    ``"coco5k"`` / ``"full"``: :func:`retrieval_metrics` on the whole matrix.
    """
    sims = _as_numpy(sims)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    _check_shape(sims, captions_per_image)
    if protocol != "coco1k":
        return retrieval_metrics(sims, captions_per_image, progress=progress)
    blocks = fold_slices(protocol, sims.shape[0], captions_per_image)
    return protocol_result([sims[i, c] for i, c in blocks], protocol, captions_per_image, progress=progress)


_HEADER_NAMES = ("R@1", "R@5", "R@10", "medr", "meanr")


def format_table(result: dict) -> str:
    """The paper's results table: R@1/5/10, medr, meanr for both directions and rsum.

    ``result`` is a :func:`retrieval_metrics` or :func:`evaluate_protocol` dict; a coco1k result
    gets one row per fold followed by the mean.
    """
    cell = "{:>7}"
    metric_cells = "".join(cell.format(name) for name in _HEADER_NAMES)
    width = len(metric_cells)
    lines = [f"{'':<8}| {'Image-to-Text':^{width}} | {'Text-to-Image':^{width}} |",
             f"{'':<8}| {metric_cells} | {metric_cells} | {'rsum':>7}"]
    lines.append("-" * len(lines[1]))

    def row(label: str, res: dict) -> str:
        def cells(direction: dict) -> str:
            return "".join(f"{direction[m]:>7.1f}" if m != "meanr" else f"{direction[m]:>7.2f}"
                           for m in METRIC_NAMES)
        return f"{label:<8}| {cells(res['i2t'])} | {cells(res['t2i'])} | {res['rsum']:>7.1f}"

    folds = result.get("folds") or []
    for index, fold in enumerate(folds):
        lines.append(row(f"fold {index}", fold))
    if folds:
        lines.append("-" * len(lines[1]))
    lines.append(row("mean" if folds else "all", result))
    return "\n".join(lines)
