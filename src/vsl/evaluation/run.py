"""``vsl eval``: checkpoints -> models, a split, a protocol, the results table and files.

:func:`evaluate` evaluates one checkpoint, or two for the SGRAF ensemble (the mean of the two
models' score matrices, each model with its own embeddings and vocabulary). Protocols
(:mod:`vsl.metrics`): ``coco1k`` = the mean over 5 folds of 1,000 images / 5,000 captions (only the
5 diagonal blocks are scored unless the full matrix is asked for); ``coco5k`` / ``full`` = all images.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import metrics
from ..data import SPLITS
from ..device import resolve_device
from ..distributed import DistInfo
from ..errors import ConfigError
from ..fileio import atomic_write, check_writable
from ..logs import progress_bar
from ..precision import precision_context
from ..rerank import two_stage_matrices, two_stage_parts
from ..runtime import encode_split, load_for_use
from .encode import score
from .sharding import image_shard

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# vsl eval
# --------------------------------------------------------------------------------------------
def evaluate(checkpoints: Sequence[PathLike], data_path: Optional[PathLike] = None, split: str = "test",
             protocol: str = "full", *, vocab_path: Optional[PathLike] = None, data_name: Optional[str] = None,
             device: str = "auto", batch_size: int = 128, output: Optional[PathLike] = None,
             save_sims: Optional[PathLike] = None, progress: bool = True,
             distributed: Optional[DistInfo] = None, precision: Optional[str] = None,
             score_chunk: Optional[int] = None, save_ranks: Optional[PathLike] = None,
             shortlist: Optional[int] = None, compare_exhaustive: bool = False) -> Dict:
    """Evaluate one checkpoint, or the ensemble of two (mean of their score matrices).

    ``data_path``, ``vocab_path`` and ``data_name`` default to the (first) checkpoint's options.
    ``distributed`` (a torchrun process): the images are split over the processes for scoring,
    every process returns the result, only the main one shows progress and writes files.
    ``precision`` (fp32/tf32/bf16) and ``score_chunk`` override the checkpoints' options.

    Returns ``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum", ["folds": [...]],
    "protocol", "split", "checkpoints", "images", "captions"}`` and optionally writes it as JSON
    (``output``) and the ``(images, captions)`` float32 score matrix as ``.npy`` (``save_sims``).
    ``save_ranks``: every query's 0-based rank under the protocol as ``.npz`` with arrays ``i2t``
    (N,) and ``t2i`` (cpi * N,) (:func:`vsl.metrics.protocol_ranks`; what ``vsl ablate`` resamples).

    ``shortlist`` K (two-stage scoring, ``vsl eval --shortlist K``; one checkpoint with a shortlist
    head, one process): each query's top K by the shortlist head are re-ranked by the exact model,
    the rest follow by shortlist score (:func:`vsl.rerank.two_stage_matrices`); a shortlisted pair
    scores ``exact + lambda * shortlist`` with the checkpoint's fusion weight (``shortlist_fusion``,
    0 = exact), so the usual table is the fused ranking's. The result adds ``"shortlist"`` ``{"k",
    "fusion", "recall_i2t", "recall_t2i", "recall": {"i2t": {K: pct}, "t2i": {...}}, "pairs_scored",
    "pairs_total", "seconds"}`` and, with ``compare_exhaustive``, ``"exhaustive"`` (the exhaustive
    metrics of the same embeddings, with ``pairs_scored`` and ``seconds_scoring``) and ``"fusion"``
    (exhaustive, plain two-stage and fused rankings side by side with paired bootstrap intervals over
    the test images, :func:`_compare`).
    """
    start = time.perf_counter()
    if shortlist is not None:
        _check_two_stage(checkpoints, shortlist, distributed, save_sims)
    elif not 1 <= len(checkpoints) <= 2:
        raise ConfigError(f"give one checkpoint, or two for the ensemble; got {len(checkpoints)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    dist_info = distributed or DistInfo()
    for target in (output, save_sims, save_ranks):   # fail before the scoring, not after it
        if target is not None and dist_info.is_main:
            check_writable(target, "file")
    dev = dist_info.device if distributed is not None else resolve_device(device)
    progress = progress and dist_info.is_main
    loaded = [load_for_use(p, dev, vocab_path, data_name, shortlist=shortlist is not None, precision=precision,
                           score_chunk=score_chunk) for p in checkpoints]
    names = {m.config.data_name for m in loaded}
    if len(names) > 1:
        raise ConfigError(f"the checkpoints were trained on different datasets ({', '.join(sorted(names))}); "
                          "pass --data_name")
    opened = [m.open_split(data_path if data_path is not None else loaded[0].config.data_path, split)
              for m in loaded]
    dataset = opened[0].dataset
    cpi = dataset.captions_per_image
    num_images = dataset.num_images
    blocks = metrics.fold_slices(protocol, num_images, cpi, full_matrix=save_sims is not None)

    if shortlist is not None:
        emb = encode_split(loaded[0].model, opened[0].images, opened[0].token_ids, batch_size=batch_size,
                           progress=progress, precision=loaded[0].config.precision, source=opened[0].source,
                           desc=f"encode {loaded[0].path.name}")
        scores, result = _two_stage(loaded[0], emb, blocks, protocol, cpi, shortlist, compare_exhaustive, progress,
                                    start)
    else:
        scores = _exhaustive(loaded, opened, blocks, dist_info, batch_size, progress)
        result = metrics.protocol_result(scores, protocol, cpi)
    result.update(protocol=protocol, split=split, checkpoints=[str(m.path) for m in loaded],
                  images=num_images, captions=num_images * cpi)
    for key in ("exhaustive", "fusion"):            # after the usual keys, as before
        if key in result:
            result[key] = result.pop(key)
    if save_sims is not None and dist_info.is_main:
        write_npy(save_sims, scores[0].astype(np.float32))
    if save_ranks is not None and dist_info.is_main:
        i2t_ranks, t2i_ranks = metrics.protocol_ranks(scores, protocol, cpi)
        atomic_write(save_ranks, lambda fh: np.savez(fh, i2t=i2t_ranks, t2i=t2i_ranks))
    if output is not None and dist_info.is_main:
        write_json(output, result)
    return result


def _exhaustive(loaded, opened, blocks, dist_info: DistInfo, batch_size: int, progress: bool) -> List[np.ndarray]:
    """Every block's score matrix: each model scores all its pairs, the ensemble takes their mean."""
    # This process's share of the pairs (all of them in a single process).
    pairs_per_model = sum(_shard_size(s.stop - s.start, dist_info) * (c.stop - c.start) for s, c in blocks)
    sums: List[Optional[torch.Tensor]] = [None] * len(blocks)
    for m, split_of_m in zip(loaded, opened):
        emb = encode_split(m.model, split_of_m.images, split_of_m.token_ids, batch_size=batch_size,
                           source=split_of_m.source,
                           progress=progress, precision=m.config.precision, desc=f"encode {m.path.name}")
        bar = progress_bar(pairs_per_model, f"score {m.path.name}", enabled=progress, unit="pair", unit_scale=True)
        for b, (img_s, cap_s) in enumerate(blocks):
            sims = score(m.model, emb.subset(img_s, cap_s), bar=bar, precision=m.config.precision,
                         group=dist_info.group)
            sums[b] = sims if sums[b] is None else sums[b] + sims
        bar.close()
        del emb
    # Ensemble = mean of the models' scores (for one model, the scores themselves).
    return [(s / len(loaded)).numpy() for s in sums]


def _check_two_stage(checkpoints: Sequence[PathLike], shortlist, distributed, save_sims) -> None:
    if len(checkpoints) != 1:
        raise ConfigError(f"--shortlist evaluates one checkpoint (with a shortlist head), got {len(checkpoints)}")
    if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
        raise ConfigError(f"--shortlist must be a positive number of candidates, got {shortlist!r}")
    if distributed is not None and distributed.world_size > 1:
        raise ConfigError("--shortlist runs in one process (it scores a few percent of the pairs); "
                          "run it without torchrun")
    if save_sims is not None:
        raise ConfigError("--save_sims needs the exhaustive score matrix; drop it or --shortlist")


def _two_stage(loaded, emb, blocks, protocol: str, cpi: int, k: int, compare_exhaustive: bool, progress: bool,
               start: float):
    """Two-stage scores of every block (``(i2t, t2i)`` matrix pairs) and their protocol result.

    The ranking is by the checkpoint's fused score (``Config.shortlist_fusion``; 0 = exact scores).
    With ``compare_exhaustive`` the result adds ``"exhaustive"`` and ``"fusion"`` (:func:`_compare`)."""
    fusion = float(loaded.config.shortlist_fusion)
    scores, plain, pairs, recalls = [], [], 0, []
    with precision_context(loaded.config.precision, loaded.model.device):
        for img_s, cap_s in blocks:
            parts = two_stage_parts(loaded.model, emb.subset(img_s, cap_s), k)
            keep_plain = compare_exhaustive and fusion != 0
            scores.append(two_stage_matrices(parts, fusion, consume=not keep_plain))
            if keep_plain:                                # the same shortlists and exact scores, lambda 0
                plain.append(two_stage_matrices(parts, 0.0, consume=True))
            pairs += parts.pairs
            recalls.append(metrics.shortlist_recall(parts.image_vecs, parts.caption_vecs, cpi,
                                                    sorted({*metrics.REPORT_KS, k})))
            del parts
    result = metrics.protocol_result(scores, protocol, cpi)
    recall = {d: {n: float(np.mean([r[d][n] for r in recalls])) for n in recalls[0][d]} for d in ("i2t", "t2i")}
    total = sum((s.stop - s.start) * (c.stop - c.start) for s, c in blocks)
    result["shortlist"] = {"k": k, "fusion": fusion, "recall_i2t": recall["i2t"][str(k)],
                           "recall_t2i": recall["t2i"][str(k)], "recall": recall, "pairs_scored": pairs,
                           "pairs_total": total, "seconds": time.perf_counter() - start}
    if compare_exhaustive:
        t0 = time.perf_counter()
        bar = progress_bar(total, "score exhaustive", enabled=progress, unit="pair", unit_scale=True)
        sims = [score(loaded.model, emb.subset(s, c), bar=bar, precision=loaded.config.precision).numpy()
                for s, c in blocks]
        bar.close()
        exhaustive = metrics.protocol_result(sims, protocol, cpi)
        exhaustive.pop("folds", None)
        exhaustive.update(pairs_scored=total, seconds_scoring=time.perf_counter() - t0)
        result["exhaustive"] = exhaustive
        result["fusion"] = _compare({"exhaustive": sims, "two_stage": plain or scores, "fused": scores},
                                    fusion, protocol, cpi)
    return scores, result


#: The paired differences of ``--compare_exhaustive``: (arm, baseline) of the rankings compared.
COMPARISONS = (("fused", "exhaustive"), ("fused", "two_stage"), ("two_stage", "exhaustive"))


def _compare(rankings: Dict[str, List], fusion: float, protocol: str, cpi: int) -> Dict:
    """Exhaustive, plain two-stage (lambda 0) and fused rankings side by side, with paired bootstrap
    intervals over the test images (:func:`vsl.ablate.paired_bootstrap`).

    Returns ``{"lambda", "rankings": {name: {metric: value}}, "paired": {"fused-exhaustive": {metric:
    {"diff", "ci95"}}, ...}}`` (metrics: R@1/5/10 of both directions and rsum)."""
    from ..ablate import paired_bootstrap, query_contributions

    contributions = {name: query_contributions(*metrics.protocol_ranks(blocks, protocol, cpi))
                     for name, blocks in rankings.items()}
    table = {name: metrics.flat_metrics(metrics.protocol_result(blocks, protocol, cpi))
             for name, blocks in rankings.items()}
    paired = {}
    for arm, base in COMPARISONS:
        diffs = paired_bootstrap([contributions[arm]], [contributions[base]])
        paired[f"{arm}-{base}"] = {m: {"diff": d["diff"], "ci95": d["ci95"]} for m, d in diffs.items()}
    return {"lambda": fusion, "rankings": table, "paired": paired}


def evaluate_shortlist(checkpoints: Sequence[PathLike], data_path: Optional[PathLike] = None, split: str = "test",
                       protocol: str = "full", *, shortlist: int = 100, compare_exhaustive: bool = False,
                       **options) -> Dict:
    """``vsl eval --shortlist K``: :func:`evaluate` with two-stage scoring (``options`` as there)."""
    return evaluate(checkpoints, data_path, split, protocol, shortlist=shortlist,
                    compare_exhaustive=compare_exhaustive, **options)


def _shard_size(num_images: int, dist_info: DistInfo) -> int:
    start, stop = image_shard(num_images, dist_info.rank, dist_info.world_size)
    return stop - start


#: The name of :func:`vsl.runtime.load_for_use` before the loading layer moved to the library.
load_for_eval = load_for_use


# --------------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------------
def write_json(path: PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_npy(path: PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as ``.npy`` at exactly ``path``, atomically."""
    return atomic_write(path, lambda fh: np.save(fh, array))
