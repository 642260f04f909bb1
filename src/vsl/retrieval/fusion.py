"""Choosing the fusion weight lambda of two-stage scores ``exact + lambda * shortlist`` on the dev split.

``vsl fit-shortlist --fit_fusion`` (:func:`vsl.retrieval.fit_shortlist`) encodes the dev split once,
scores each query's shortlist of ``fusion_k`` items with the exact model once
(:func:`vsl.rerank.two_stage_parts`), ranks them under every weight of a grid at once
(:func:`vsl.rerank.fused_ranks`) and keeps the weight with the highest dev rsum of the two-stage
ranking (the smallest such weight on a tie: 0, today's ranking, unless fusion helps). The grid is 0
and 25 weights from 1/64 to 64, a factor sqrt(2) apart: exact scores of SGR/SAF lie in (0, 1) and
cosines in [-1, 1], so the grid spans "cosine breaks ties of the exact score" to "exact score
breaks ties of the cosine". The table of the grid is returned (and stored in the checkpoint).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence, Union

import numpy as np

from .. import metrics
from ..data import split_files
from ..errors import DataError
from ..precision import precision_context
from ..rerank import TwoStageParts, fused_ranks, two_stage_parts
from ..runtime import LoadedModel, encode_split

PathLike = Union[str, os.PathLike]
#: Shortlist size of the fit (vsl search's default shortlist).
FUSION_K = 100
#: Weights tried: 0 and 2^(-6) .. 2^6, a factor sqrt(2) apart.
FUSION_GRID = (0.0,) + tuple(float(x) for x in np.geomspace(2.0 ** -6, 2.0 ** 6, 25))


def check_split(data_path: PathLike, data_name: str, split: str) -> None:
    """A DataError naming the missing files when ``split`` is not in ``data_path``."""
    missing = [str(p) for p in split_files(data_path, data_name, split) if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: not found; --fit_fusion chooses the fusion weight on the {split} split, "
                        f"which {data_path} must hold")


def rsum_of_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> Dict[str, np.ndarray]:
    """Recalls and rsum of ``(G, n)`` / ``(G, m)`` ranks, one value per row: ``{metric: (G,)}``."""
    out = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        table = np.array([metrics.recall_at_k(r, metrics.RECALL_KS) for r in ranks]).reshape(len(ranks), -1)
        for column, k in enumerate(metrics.RECALL_KS):
            out[f"{direction}_r{k}"] = table[:, column]
    out["rsum"] = np.sum([out[name] for name, _, _ in metrics.RECALLS], axis=0)
    return out


def choose_fusion(loaded: LoadedModel, data_path: PathLike, split: str = "dev", *, k: int = FUSION_K,
                  grid: Sequence[float] = FUSION_GRID, batch_size: int = 128,
                  progress: bool = True) -> Dict[str, Any]:
    """The weight of ``grid`` that maximizes the rsum of the two-stage ranking of ``split`` (full protocol).

    ``loaded``: a model with a shortlist head. Returns ``{"lambda", "split", "k", "images", "rsum":
    {"plain", "fused"}, "grid": [{"lambda", "i2t_r1", ..., "rsum"}, ...]}`` (the grid in order).
    """
    opened = loaded.open_split(data_path, split)
    emb = encode_split(loaded.model, opened.images, opened.token_ids, batch_size=batch_size, progress=progress,
                       precision=loaded.config.precision, source=opened.source, desc=f"encode {split}")
    with precision_context(loaded.config.precision, loaded.model.device):
        parts = two_stage_parts(loaded.model, emb, k)
    del emb
    lam, rows = best_fusion(parts, grid, opened.dataset.captions_per_image)
    plain = next((r["rsum"] for r in rows if r["lambda"] == 0.0), None)
    fused = next(r["rsum"] for r in rows if r["lambda"] == lam)
    return {"lambda": lam, "split": split, "k": int(parts.i2t_top.shape[1]), "images": opened.dataset.num_images,
            "rsum": {"plain": plain, "fused": fused}, "grid": rows}


def best_fusion(parts: TwoStageParts, grid: Sequence[float], captions_per_image: int):
    """``(lambda, rows)``: the weight of ``grid`` with the highest rsum of the two-stage ranking of
    ``parts`` (the smallest on a tie), and one row ``{"lambda", "i2t_r1", ..., "rsum"}`` per weight
    in increasing order."""
    grid = sorted({float(x) for x in grid})
    i2t_ranks, t2i_ranks = fused_ranks(parts, grid, captions_per_image)
    table = rsum_of_ranks(i2t_ranks, t2i_ranks)
    best = int(np.argmax(table["rsum"]))                 # the first maximum: the smallest weight
    rows = [{"lambda": lam, **{name: float(values[g]) for name, values in table.items()}}
            for g, lam in enumerate(grid)]
    return grid[best], rows


def format_fusion(summary: Dict[str, Any]) -> str:
    """The grid table of :func:`choose_fusion`, the chosen weight marked."""
    names = [name for name, _, _ in metrics.RECALLS] + ["rsum"]
    lines = [f"fusion weight lambda on {summary['split']} ({summary['images']:,} images, shortlist K = "
             f"{summary['k']}): final score = exact + lambda * shortlist cosine",
             "  " + f"{'lambda':>9}" + "".join(f"{n:>9}" for n in names)]
    for row in summary["grid"]:
        mark = "  <- chosen" if row["lambda"] == summary["lambda"] else ""
        lines.append("  " + f"{row['lambda']:9.4g}" + "".join(f"{row[n]:9.2f}" for n in names) + mark)
    return "\n".join(lines)

