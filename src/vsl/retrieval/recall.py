"""Shortlist recall: how often the true match is among the top K of the shortlist vectors.

``image_vecs (n, D)`` and ``caption_vecs (cpi * n, D)`` are l2-normalised global vectors of a split
(captions ``cpi * i .. cpi * i + cpi - 1`` describe image ``i``). Image->text: a query image is
recalled at K when one of its own captions is among its K best captions; text->image: when the
caption's own image is among its K best images. Ties count against the query (a candidate with an
equal score is ranked above), so the recall is never overstated.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch

#: Shortlist sizes reported by ``vsl fit-shortlist`` and ``vsl eval --shortlist``.
REPORT_KS = (10, 50, 100, 200)
#: Query rows scored per chunk (bounds the (rows, gallery) block to ~64 MB at 25,000 captions).
_ROWS = 640


@torch.no_grad()
def shortlist_ranks(image_vecs: torch.Tensor, caption_vecs: torch.Tensor,
                    captions_per_image: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """0-based shortlist ranks of the true matches: ``(i2t (n,), t2i (m,))`` int64.

    i2t rank of image i = number of captions that score at least as high as its best own caption,
    other than that caption; t2i rank of caption j = number of other images scoring at least as
    high as its own image.
    """
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


def shortlist_recall(image_vecs: torch.Tensor, caption_vecs: torch.Tensor, captions_per_image: int,
                     ks: Iterable[int] = REPORT_KS) -> Dict[str, Dict[str, float]]:
    """``{"i2t": {"10": pct, ...}, "t2i": {...}}``: percentage of queries recalled at each K."""
    i2t, t2i = shortlist_ranks(image_vecs, caption_vecs, captions_per_image)
    return {name: {str(k): float(100.0 * (ranks < k).double().mean()) for k in ks}
            for name, ranks in (("i2t", i2t), ("t2i", t2i))}
