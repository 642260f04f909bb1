"""Re-ranking: the second stage of two-stage retrieval, shared by search and evaluation.

A query's shortlist (its top items by the shortlist head's cosine) is scored by the exact model and
ordered by :func:`reranked_score`; items outside the shortlist keep their shortlist score, below
every shortlisted one. :func:`rerank` does it for a batch of queries over candidate ids (both
directions of ``vsl search``); :func:`two_stage_scores` for all queries of an encoded split, as
score matrices the protocol metrics read (``vsl eval --shortlist K``).
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch

#: Offset that puts every exactly scored pair (scores in (0, 1)) above every unscored one (cosines in [-1, 1]).
OFFSET = 3.0

#: ``score_pairs(unique_candidates (U,), query_index (P,), candidate_index (P,)) -> (P,)`` exact scores
#: of the pairs (query ``query_index[p]``, candidate ``unique_candidates[candidate_index[p]]``).
PairScorer = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]


def reranked_score(exact: torch.Tensor, shortlist: torch.Tensor) -> torch.Tensor:
    """The final score of a shortlisted pair from its exact and its shortlist score: the exact score."""
    return exact


@torch.inference_mode()
def rerank(candidates: np.ndarray, shortlist_scores: np.ndarray, score_pairs: PairScorer,
           k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``k`` of each query's shortlist by :func:`reranked_score`.

    ``candidates`` ``(Q, S)`` int64 gallery ids (-1: an approximate index found fewer), with their
    ``shortlist_scores`` ``(Q, S)``; each distinct candidate is gathered once (``score_pairs`` gets
    the sorted unique ids). Returns ``(ids, scores, shortlist_scores)``, each ``(Q, min(k, S))``,
    best first (ties in the order of the shortlist), missing candidates last with score -inf.
    """
    q, s = candidates.shape
    uniq, inverse = np.unique(np.where(candidates < 0, 0, candidates), return_inverse=True)
    exact = score_pairs(uniq, torch.arange(q).repeat_interleave(s),
                        torch.from_numpy(inverse.reshape(-1))).view(q, s).float().cpu()
    final = reranked_score(exact, torch.from_numpy(np.asarray(shortlist_scores)))
    final[torch.from_numpy(candidates < 0)] = float("-inf")
    order = torch.argsort(final, dim=1, descending=True, stable=True)[:, :k].numpy()
    return (np.take_along_axis(candidates, order, 1), np.take_along_axis(final.numpy(), order, 1),
            np.take_along_axis(shortlist_scores, order, 1))


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
def two_stage_scores(model, emb, k: int) -> Tuple[np.ndarray, np.ndarray, int, torch.Tensor, torch.Tensor]:
    """Two-stage score matrices of an encoded block (:class:`vsl.runtime.Embeddings`, n images x m captions).

    Each image query ranks its own top ``k`` captions by :func:`reranked_score` (offset above the
    rest), every other caption by cosine; likewise each caption query over the images. The union
    of both directions' pairs is scored once. Returns ``(i2t_sims (n, m), t2i_sims (n, m), pairs
    scored, image vectors (n, D), caption vectors (m, D))``: ``i2t_sims`` ranks captions per row,
    ``t2i_sims`` images per column.
    """
    head = model.shortlist
    img_vecs = head.images(emb.images).float()
    cap_vecs = head.captions(emb.captions, emb.lengths.to(emb.captions.device)).float()
    cos, i2t_top, t2i_top, pi, pc = shortlist_pairs(img_vecs, cap_vecs, k)
    exact = model.sim_enc.score_pairs(emb.images, emb.captions, emb.lengths, pi, pc).float()
    n, m = cos.shape
    union = pi * m + pc                                  # sorted: nonzero() is row-major

    def final_of(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return reranked_score(exact[torch.searchsorted(union, rows * m + cols)], cos[rows, cols]) + OFFSET

    i2t_rows = torch.arange(n, device=cos.device).unsqueeze(1)
    t2i_cols = torch.arange(m, device=cos.device).unsqueeze(0)
    i2t_final, t2i_final = final_of(i2t_rows, i2t_top), final_of(t2i_top, t2i_cols)
    i2t_sims = cos - OFFSET
    i2t_sims.scatter_(1, i2t_top, i2t_final)
    t2i_sims = cos.sub_(OFFSET)                          # cos is not needed any more
    t2i_sims.scatter_(0, t2i_top, t2i_final)
    return i2t_sims.cpu().numpy(), t2i_sims.cpu().numpy(), int(pi.numel()), img_vecs, cap_vecs
