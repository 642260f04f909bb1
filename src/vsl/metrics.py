"""Retrieval metrics and evaluation protocols of the SCAN/SGRAF evaluation: R@K, median and mean
rank, rsum; ``coco1k`` (mean over 5 folds), ``coco5k`` and ``full`` (the whole matrix); and the
shortlist recall of two-stage retrieval (:func:`shortlist_recall`).

Every metric is named here once: a direction's metrics are a :class:`Summary` (``r1 r5 r10 medr
meanr``), a result is ``{"i2t": {...}, "t2i": {...}, "rsum"}``, and the flat names of tables and
ablation statistics (``i2t_r1`` ... ``rsum``, :data:`TABLE_METRICS`) are read with :func:`flat_metrics`.

``sims`` is an (N, cpi * N) image x caption similarity matrix in which captions
``cpi * i .. cpi * i + cpi - 1`` belong to image i (cpi = captions per image, 5 for COCO/Flickr30K).

Ranks are 0-based positions in a descending ``np.argsort`` of each row, exactly as the published
per-row loop computes them: here one 2-D ``np.argsort(..., axis=1)`` runs the same per-row sort, so
ties are broken identically. Rows are processed in chunks so that a 5,000 x 25,000 matrix needs
only tens of MB beyond the matrix itself.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, NamedTuple, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .errors import ConfigError

#: Elements of sorted indices (int64) held at once per chunk: 32 MB.
CHUNK_ELEMENTS = 1 << 22

PROTOCOLS = ("coco1k", "coco5k", "full")
COCO1K_FOLDS = 5
COCO1K_FOLD_IMAGES = 1000
DIRECTIONS = ("i2t", "t2i")
RECALL_KS = (1, 5, 10)


class Summary(NamedTuple):
    """One direction's metrics with the published conventions: R@1/5/10 in %, 1-based median and mean rank."""

    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float

    @property
    def recall_sum(self) -> float:
        """R@1 + R@5 + R@10 (a direction's share of rsum)."""
        return sum(self[:len(RECALL_KS)])

    def as_dict(self) -> Dict[str, float]:
        return dict(self._asdict())


METRIC_NAMES = Summary._fields
#: The recalls of both directions as flat names: ``("i2t_r1", "i2t", 1), ...`` (table columns).
RECALLS: Tuple[Tuple[str, str, int], ...] = tuple((f"{d}_r{k}", d, k) for d in DIRECTIONS for k in RECALL_KS)
#: The columns of result tables and ablation summaries: the six recalls and rsum.
TABLE_METRICS: Tuple[str, ...] = tuple(name for name, _, _ in RECALLS) + ("rsum",)
#: Median and mean ranks of both directions, flat (``i2t_medr`` ...).
RANK_METRICS: Tuple[str, ...] = tuple(f"{d}_{m}" for d in DIRECTIONS for m in METRIC_NAMES[len(RECALL_KS):])


def flat_metrics(result: Mapping, names: Sequence[str] = TABLE_METRICS) -> Dict[str, float]:
    """``{"i2t_r1": .., ..., "rsum": ..}`` (the flat ``names``) from a result ``{"i2t": {"r1": ..}, ...}``."""
    out = {}
    for name in names:
        direction, _, metric = name.partition("_")
        out[name] = float(result[name] if name == "rsum" else result[direction][metric])
    return out


def column_labels(names: Sequence[str] = TABLE_METRICS) -> List[str]:
    """Table headers of flat names: ``i2t R@1, R@5, R@10, t2i R@1, ...`` (a direction named once)."""
    labels, last = [], None
    for name in names:
        direction, _, metric = name.partition("_")
        shown = f"R@{metric[1:]}" if metric.startswith("r") and metric[1:].isdigit() else metric
        labels.append(name if name == "rsum" else (shown if direction == last else f"{direction} {shown}"))
        last = direction
    return labels


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
    r1, r5, r10 = recall_at_k(ranks, RECALL_KS)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return Summary(float(r1), float(r5), float(r10), float(medr), float(meanr))


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
    ranks, top1 = _query_ranks(
        n_images, n_captions, lambda lo, hi: sims[lo:hi],                      # captions of each image
        lambda order, lo, hi: order // captions_per_image == np.arange(lo, hi)[:, None], progress, "i2t")
    return _summary(ranks), (ranks, top1)


def _query_ranks(n_queries: int, n_items: int, rows, is_own, progress: bool, desc: str
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Each query's first 0-based position of an own item and its top item, ``(n_queries,)`` int64 each.

    ``rows(lo, hi)``: the scores ``(hi - lo, n_items)`` of queries ``lo:hi``; ``is_own(order, lo, hi)``:
    which entries of their items, best first, are their own."""
    ranks = np.empty(n_queries, dtype=np.int64)
    top1 = np.empty(n_queries, dtype=np.int64)
    for lo, hi in _chunks(n_queries, n_items, progress, desc):
        order = np.argsort(rows(lo, hi), axis=1)[:, ::-1]           # items, best first
        ranks[lo:hi] = is_own(order, lo, hi).argmax(axis=1)          # first own item
        top1[lo:hi] = order[:, 0]
    return ranks, top1


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
    ranks, top1 = _query_ranks(
        n_captions, n_images, lambda lo, hi: sims[:, lo:hi].T,                 # images of each caption
        lambda order, lo, hi: order == (np.arange(lo, hi) // captions_per_image)[:, None], progress, "t2i")
    return _summary(ranks), (ranks, top1)


def retrieval_metrics(sims, captions_per_image: int = 5, *, progress: bool = False, t2i_sims=None) -> dict:
    """``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum": R@1+R@5+R@10 of both}``.

    ``t2i_sims``: a separate matrix for text->image (two-stage scoring ranks each direction's own
    shortlist, :func:`vsl.rerank.two_stage_scores`); ``sims`` then ranks image->text only.
    """
    i2t_summary, _ = i2t(sims, captions_per_image, progress=progress)
    t2i_summary, _ = t2i(sims if t2i_sims is None else t2i_sims, captions_per_image, progress=progress)
    rsum = i2t_summary.recall_sum + t2i_summary.recall_sum
    return {"i2t": i2t_summary.as_dict(), "t2i": t2i_summary.as_dict(), "rsum": float(rsum)}


def _directions(block) -> Tuple:
    """A scored block as ``(i2t matrix, t2i matrix)``: one matrix serves both, or a pair of them."""
    return tuple(block) if isinstance(block, tuple) else (block, block)


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
    return {"i2t": Summary(*(float(v) for v in table[:n])).as_dict(),
            "t2i": Summary(*(float(v) for v in table[n:2 * n])).as_dict(),
            "rsum": float(table[-1]), "folds": folds}


def protocol_result(blocks: List, protocol: str, captions_per_image: int = 5, *, progress: bool = False) -> dict:
    """Protocol metrics from the blocks of :func:`fold_slices`, scored (one matrix or the 5 folds).

    A block is a score matrix, or an ``(i2t, t2i)`` pair of them (two-stage scoring)."""
    if len(blocks) == 1 and not isinstance(blocks[0], tuple):
        return evaluate_protocol(blocks[0], protocol, captions_per_image, progress=progress)
    folds = [retrieval_metrics(a, captions_per_image, t2i_sims=b) for a, b in
             tqdm([_directions(b) for b in blocks], desc=f"{protocol} folds", disable=not progress, leave=False)]
    return folds[0] if len(folds) == 1 else mean_over_folds(folds)


def protocol_ranks(blocks: List, protocol: str, captions_per_image: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """Every query's 0-based rank under a protocol, from the blocks of :func:`fold_slices`.

    Returns ``(i2t, t2i)`` in split order: (N,) int64, the rank of each image's best own caption,
    and (cpi * N,) int64, the rank of each caption's image; under ``coco1k`` ranks are within each
    fold of 1,000 images (whether the 5 folds or the full matrix were scored).
    """
    if protocol == "coco1k" and len(blocks) == 1 and not isinstance(blocks[0], tuple):   # the full matrix: cut it
        sims = _as_numpy(blocks[0])
        blocks = [sims[i, c] for i, c in fold_slices(protocol, sims.shape[0], captions_per_image)]
    pairs = [_directions(b) for b in blocks]
    i2t_ranks = [i2t(a, captions_per_image)[1][0] for a, _ in pairs]
    t2i_ranks = [t2i(b, captions_per_image)[1][0] for _, b in pairs]
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


_HEADER_NAMES = tuple(f"R@{k}" for k in RECALL_KS) + METRIC_NAMES[len(RECALL_KS):]


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


# ------------------------------------------------------------------------------------------------
# Shortlist recall: how often the true match is among the top K of the shortlist vectors.
#
# ``image_vecs (n, D)`` and ``caption_vecs (cpi * n, D)`` are l2-normalised global vectors of a split
# (torch tensors). Image->text: a query image is recalled at K when one of its own captions is among
# its K best captions; text->image: when the caption's own image is among its K best images. Ties
# count against the query (a candidate with an equal score is ranked above), so the recall is never
# overstated.
# ------------------------------------------------------------------------------------------------
#: Shortlist sizes reported by ``vsl fit-shortlist`` and ``vsl eval --shortlist``.
REPORT_KS = (10, 50, 100, 200)
#: Query rows scored per chunk (bounds the (rows, gallery) block to ~64 MB at 25,000 captions).
_ROWS = 640


def shortlist_ranks(image_vecs, caption_vecs, captions_per_image: int):
    """0-based shortlist ranks of the true matches: ``(i2t (n,), t2i (m,))`` int64.

    i2t rank of image i = number of captions that score at least as high as its best own caption,
    other than that caption; t2i rank of caption j = number of other images scoring at least as
    high as its own image.
    """
    import torch

    with torch.no_grad():
        return _shortlist_ranks(image_vecs, caption_vecs, captions_per_image)


def _shortlist_ranks(image_vecs, caption_vecs, captions_per_image: int):
    import torch

    n, m = image_vecs.size(0), caption_vecs.size(0)
    cpi = captions_per_image
    if m != cpi * n:
        raise ValueError(f"{m} caption vectors for {n} images with {cpi} captions per image")
    i2t = torch.empty(n, dtype=torch.int64)
    for lo in range(0, n, _ROWS):
        hi = min(n, lo + _ROWS)
        sims = image_vecs[lo:hi] @ caption_vecs.t()                               # (q, m)
        own = sims.view(hi - lo, n, cpi)[torch.arange(hi - lo), torch.arange(lo, hi)]   # (q, cpi)
        best = own.amax(dim=1, keepdim=True)
        i2t[lo:hi] = ((sims >= best).sum(dim=1) - 1).cpu()
    t2i = torch.empty(m, dtype=torch.int64)
    for lo in range(0, m, _ROWS):
        hi = min(m, lo + _ROWS)
        sims = caption_vecs[lo:hi] @ image_vecs.t()                               # (q, n)
        own = sims[torch.arange(hi - lo), torch.arange(lo, hi) // cpi].unsqueeze(1)
        t2i[lo:hi] = ((sims >= own).sum(dim=1) - 1).cpu()
    return i2t, t2i


def shortlist_recall(image_vecs, caption_vecs, captions_per_image: int,
                     ks: Iterable[int] = REPORT_KS) -> Dict[str, Dict[str, float]]:
    """``{"i2t": {"10": pct, ...}, "t2i": {...}}``: percentage of queries recalled at each K."""
    i2t, t2i = shortlist_ranks(image_vecs, caption_vecs, captions_per_image)
    return {name: {str(k): float(100.0 * (ranks < k).double().mean()) for k in ks}
            for name, ranks in (("i2t", i2t), ("t2i", t2i))}
