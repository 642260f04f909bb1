"""``vsl eval --shortlist K``: two-stage evaluation of a split, a shortlist and exact re-ranking.

Each image query (image->text) and each caption query (text->image) gets its top K gallery items
by the shortlist head's cosine; only those pairs (the union of both directions, each scored once)
are scored by the exact model. Each query's ranking is then its K shortlisted items by exact score,
followed by every other item by shortlist score -- what a two-stage search engine returns -- and
the usual protocol metrics are computed from it, with the shortlist recall (how often the true
match made the shortlist), the number of pairs scored and the time.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import metrics
from ..errors import ConfigError
from .recall import REPORT_KS, shortlist_recall

PathLike = Union[str, os.PathLike]
#: Offset that puts every exactly scored pair (scores in (0, 1)) above every unscored one (cosines in [-1, 1]).
_OFFSET = 3.0


@torch.inference_mode()
def shortlist_pairs(image_vecs: torch.Tensor, caption_vecs: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    """Shortlists of both directions and the union of their pairs.

    Returns ``(cos (n, m), i2t_top (n, k_c), t2i_top (k_i, m), pair_images (P,), pair_captions (P,))``
    with ``k_c = min(k, m)``, ``k_i = min(k, n)``; the pairs are unique, in row-major order.
    """
    cos = image_vecs @ caption_vecs.t()                                          # (n, m)
    n, m = cos.shape
    i2t_top = torch.topk(cos, min(k, m), dim=1).indices                          # (n, k_c) captions per image
    t2i_top = torch.topk(cos, min(k, n), dim=0).indices                          # (k_i, m) images per caption
    chosen = torch.zeros(n, m, dtype=torch.bool, device=cos.device)
    chosen.scatter_(1, i2t_top, True)
    chosen.scatter_(0, t2i_top, True)
    pair_images, pair_captions = chosen.nonzero(as_tuple=True)
    return cos, i2t_top, t2i_top, pair_images, pair_captions


@torch.inference_mode()
def two_stage_block(model, emb, k: int, captions_per_image: int) -> Dict:
    """Metrics of one protocol block (:class:`vsl.evaluation.Embeddings` of its images and captions).

    Returns ``{"metrics": retrieval_metrics-form dict, "pairs_scored", "shortlist_ranks": (i2t, t2i)}``.
    """
    head = model.shortlist
    img_vecs = head.images(emb.images).float()
    cap_vecs = head.captions(emb.captions, emb.lengths.to(emb.captions.device)).float()
    cos, i2t_top, t2i_top, pi, pc = shortlist_pairs(img_vecs, cap_vecs, k)
    exact = model.sim_enc.score_pairs(emb.images, emb.captions, emb.lengths, pi, pc).float()
    n, m = cos.shape
    union = pi * m + pc                                  # sorted: nonzero() is row-major

    def exact_of(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return exact[torch.searchsorted(union, rows * m + cols)] + _OFFSET

    # Each direction ranks its own shortlist by exact score, everything else by cosine below it.
    i2t_sims = cos - _OFFSET
    i2t_sims.scatter_(1, i2t_top, exact_of(torch.arange(n, device=cos.device).unsqueeze(1), i2t_top))
    t2i_sims = cos.sub_(_OFFSET)                         # cos is not needed any more
    t2i_sims.scatter_(0, t2i_top, exact_of(t2i_top, torch.arange(m, device=cos.device).unsqueeze(0)))
    i2t_summary, _ = metrics.i2t(i2t_sims.cpu().numpy(), captions_per_image)
    t2i_summary, _ = metrics.t2i(t2i_sims.cpu().numpy(), captions_per_image)
    result = {"i2t": dict(zip(metrics.METRIC_NAMES, i2t_summary)),
              "t2i": dict(zip(metrics.METRIC_NAMES, t2i_summary)),
              "rsum": float(sum(i2t_summary[:3]) + sum(t2i_summary[:3]))}
    return {"metrics": result, "pairs_scored": int(pi.numel()),
            "recall": shortlist_recall(img_vecs, cap_vecs, captions_per_image, sorted({*REPORT_KS, k}))}


def evaluate_shortlist(checkpoints: Sequence[PathLike], data_path: Optional[PathLike] = None, split: str = "test",
                       protocol: str = "full", *, shortlist: int = 100, compare_exhaustive: bool = False,
                       vocab_path: Optional[PathLike] = None, data_name: Optional[str] = None, device: str = "auto",
                       batch_size: int = 128, output: Optional[PathLike] = None, progress: bool = True,
                       distributed=None, precision: Optional[str] = None,
                       score_chunk: Optional[int] = None) -> Dict:
    """``vsl eval --shortlist K``: the usual result dict, plus ``"shortlist"``
    ``{"k", "recall_i2t", "recall_t2i", "recall": {"i2t": {K: pct}, "t2i": {...}}, "pairs_scored",
    "pairs_total", "seconds"}`` and, with ``compare_exhaustive``, ``"exhaustive"`` (the exhaustive
    metrics of the same embeddings, with their pairs and seconds).

    One checkpoint with a shortlist head, in one process (``distributed`` with more than one
    process is refused).
    """
    from ..device import resolve_device
    from ..evaluation import score, write_json
    from ..runtime import encode_split, load_for_use
    from ..metrics import fold_slices, protocol_result
    from ..fileio import check_writable
    from ..logs import progress_bar
    from ..precision import precision_context

    start = time.perf_counter()
    if len(checkpoints) != 1:
        raise ConfigError(f"--shortlist evaluates one checkpoint (with a shortlist head), got {len(checkpoints)}")
    if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
        raise ConfigError(f"--shortlist must be a positive number of candidates, got {shortlist!r}")
    if distributed is not None and distributed.world_size > 1:
        raise ConfigError("--shortlist runs in one process (it scores a few percent of the pairs); "
                          "run it without torchrun")
    if output is not None:
        check_writable(output, "file")
    dev = resolve_device(device)
    loaded = load_for_use(checkpoints[0], dev, vocab_path, data_name, shortlist=True, precision=precision,
                          score_chunk=score_chunk)
    opened = loaded.open_split(data_path, split)
    cpi, n = opened.dataset.captions_per_image, opened.dataset.num_images
    blocks = fold_slices(protocol, n, cpi)
    emb = encode_split(loaded.model, opened.images, opened.token_ids, batch_size=batch_size, progress=progress,
                       precision=loaded.config.precision, source=opened.source,
                       desc=f"encode {loaded.path.name}")
    results, pairs, recalls = [], 0, []
    with precision_context(loaded.config.precision, dev):
        for img_s, cap_s in blocks:
            block = two_stage_block(loaded.model, emb.subset(img_s, cap_s), shortlist, cpi)
            results.append(block["metrics"])
            pairs += block["pairs_scored"]
            recalls.append(block["recall"])
    result = results[0] if len(results) == 1 else metrics.mean_over_folds(results)
    seconds = time.perf_counter() - start
    recall = {d: {k: float(np.mean([r[d][k] for r in recalls])) for k in recalls[0][d]} for d in ("i2t", "t2i")}
    total = sum((s.stop - s.start) * (c.stop - c.start) for s, c in blocks)
    result["shortlist"] = {"k": shortlist, "recall_i2t": recall["i2t"][str(shortlist)],
                           "recall_t2i": recall["t2i"][str(shortlist)], "recall": recall,
                           "pairs_scored": pairs, "pairs_total": total, "seconds": seconds}
    result.update(protocol=protocol, split=split, checkpoints=[str(loaded.path)], images=n, captions=n * cpi)
    if compare_exhaustive:
        t0 = time.perf_counter()
        bar = progress_bar(total, "score exhaustive", enabled=progress, unit="pair", unit_scale=True)
        sims = [score(loaded.model, emb.subset(s, c), bar=bar, precision=loaded.config.precision).numpy()
                for s, c in blocks]
        bar.close()
        exhaustive = protocol_result(sims, protocol, cpi)
        exhaustive.pop("folds", None)
        exhaustive.update(pairs_scored=total, seconds_scoring=time.perf_counter() - t0)
        result["exhaustive"] = exhaustive
    if output is not None:
        write_json(output, result)
    return result



def format_shortlist(result: Dict) -> str:
    """The table of ``vsl eval --shortlist``: metrics, shortlist recall, pairs and time (and exhaustive)."""
    sl = result["shortlist"]
    lines = [f"{' + '.join(result['checkpoints'])} on {result['split']} ({result['images']} images, "
             f"{result['captions']} captions), protocol {result['protocol']}, shortlist K = {sl['k']}:",
             metrics.format_table(result),
             f"shortlist recall at K = {sl['k']}: i2t {sl['recall_i2t']:.1f}%, t2i {sl['recall_t2i']:.1f}%; "
             f"pairs scored {sl['pairs_scored']:,} of {sl['pairs_total']:,} "
             f"({100 * sl['pairs_scored'] / max(1, sl['pairs_total']):.1f}%); {sl['seconds']:.1f} s end to end"]
    ks = list(sl["recall"]["i2t"])
    lines.append("shortlist recall at K " + ", ".join(
        f"{k}: {sl['recall']['i2t'][k]:.1f}/{sl['recall']['t2i'][k]:.1f}" for k in ks) + " (i2t/t2i %)")
    if "exhaustive" in result:
        ex = result["exhaustive"]
        lines += ["exhaustive scoring of the same embeddings:", metrics.format_table(ex),
                  f"exhaustive scoring {ex['seconds_scoring']:.1f} s for {ex['pairs_scored']:,} pairs"]
    return "\n".join(lines)
