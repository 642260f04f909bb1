"""Re-ranking: the second stage of two-stage retrieval, shared by search and evaluation.

A query's shortlist (its top items by the shortlist head's cosine) is scored by the exact model and
ordered by :func:`reranked_score`; items outside the shortlist keep their shortlist score, below
every shortlisted one. :func:`rerank` does it for a batch of queries over candidate ids (both
directions of ``vsl search``); :func:`two_stage_scores` for all queries of an encoded split, as
score matrices the protocol metrics read (``vsl eval --shortlist K``).

Score fusion: the final score of a shortlisted pair is ``exact + fusion * shortlist`` (the fusion
weight lambda, ``Config.shortlist_fusion``, chosen on the dev split by ``vsl fit-shortlist
--fit_fusion``); lambda = 0 is the exact score itself, bit for bit. The shortlist head was fitted
on the training split with its own objective and sees every region and word at once, so where the
exact model is weak its cosine carries information that the exact score lacks (a BLIP-2-style sum
of a matching score and a contrastive one). :func:`two_stage_parts` scores the shortlisted pairs of
a split once; :func:`two_stage_matrices` and :func:`fused_ranks` then rank them under any lambda
(the latter for a whole grid of lambdas at once, for fitting it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import numpy as np
import torch

#: Offset that puts every exactly scored pair (scores in (0, 1)) above every unscored one (cosines in [-1, 1]).
#: A fused score ``exact + lambda * cosine`` lies in (-lambda, 1 + lambda): it gets ``OFFSET + lambda``.
OFFSET = 3.0

#: ``score_pairs(unique_candidates (U,), query_index (P,), candidate_index (P,)) -> (P,)`` exact scores
#: of the pairs (query ``query_index[p]``, candidate ``unique_candidates[candidate_index[p]]``).
PairScorer = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]


def reranked_score(exact: torch.Tensor, shortlist: torch.Tensor, fusion: float = 0.0) -> torch.Tensor:
    """The final score of shortlisted pairs: ``exact + fusion * shortlist`` (any shape, element-wise).

    ``fusion`` 0 returns ``exact`` itself (today's ranking, bit for bit: no arithmetic is done).
    """
    if not fusion:
        return exact
    return exact + fusion * shortlist.to(device=exact.device, dtype=exact.dtype)


def check_fusion(fusion, source: str = "fusion weight") -> float:
    """``fusion`` as a float, or a ConfigError: the weight must be finite and >= 0."""
    from .errors import ConfigError

    if isinstance(fusion, bool) or not isinstance(fusion, (int, float, np.floating, np.integer)) \
            or not np.isfinite(fusion) or fusion < 0:
        raise ConfigError(f"{source} must be a finite number >= 0 (0 = exact scores only), got {fusion!r}")
    return float(fusion)


@torch.inference_mode()
def rerank(candidates: np.ndarray, shortlist_scores: np.ndarray, score_pairs: PairScorer,
           k: int, fusion: float = 0.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The best ``k`` of each query's shortlist by :func:`reranked_score` (with weight ``fusion``).

    ``candidates`` ``(Q, S)`` int64 gallery ids (-1: an approximate index found fewer), with their
    ``shortlist_scores`` ``(Q, S)``; each distinct candidate is gathered once (``score_pairs`` gets
    the sorted unique ids). Returns ``(ids, scores, exact_scores, shortlist_scores)``, each
    ``(Q, min(k, S))``, best first by ``scores`` (the fused ones; ties in the order of the
    shortlist), missing candidates last with score -inf.
    """
    q, s = candidates.shape
    uniq, inverse = np.unique(np.where(candidates < 0, 0, candidates), return_inverse=True)
    exact = score_pairs(uniq, torch.arange(q).repeat_interleave(s),
                        torch.from_numpy(inverse.reshape(-1))).view(q, s).float().cpu()
    final = reranked_score(exact, torch.from_numpy(np.asarray(shortlist_scores)), fusion)
    if final is not exact:
        exact[torch.from_numpy(candidates < 0)] = float("-inf")
    final[torch.from_numpy(candidates < 0)] = float("-inf")
    order = torch.argsort(final, dim=1, descending=True, stable=True)[:, :k].numpy()
    return (np.take_along_axis(candidates, order, 1), np.take_along_axis(final.numpy(), order, 1),
            np.take_along_axis(exact.numpy(), order, 1), np.take_along_axis(shortlist_scores, order, 1))


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


@dataclass
class TwoStageParts:
    """The shortlists of an encoded block (n images x m captions) and the exact scores of their pairs.

    ``cos`` ``(n, m)`` float32 shortlist cosines; ``i2t_top`` ``(n, k_c)`` each image's shortlisted
    captions and ``t2i_top`` ``(k_i, m)`` each caption's shortlisted images (best first by cosine);
    ``i2t_exact`` ``(n, k_c)`` and ``t2i_exact`` ``(k_i, m)`` the exact scores at those positions;
    ``pairs``: the distinct pairs scored (the union of both directions, each scored once);
    ``image_vecs`` ``(n, D)``, ``caption_vecs`` ``(m, D)`` the head's vectors.
    """

    cos: torch.Tensor
    i2t_top: torch.Tensor
    t2i_top: torch.Tensor
    i2t_exact: torch.Tensor
    t2i_exact: torch.Tensor
    pairs: int
    image_vecs: torch.Tensor
    caption_vecs: torch.Tensor


@torch.inference_mode()
def two_stage_parts(model, emb, k: int) -> TwoStageParts:
    """Shortlists of both directions of an encoded block (:class:`vsl.runtime.Embeddings`) and the
    exact scores of the union of their pairs, each pair scored once."""
    head = model.shortlist
    img_vecs = head.images(emb.images).float()
    cap_vecs = head.captions(emb.captions, emb.lengths.to(emb.captions.device)).float()
    cos, i2t_top, t2i_top, pi, pc = shortlist_pairs(img_vecs, cap_vecs, k)
    exact = model.sim_enc.score_pairs(emb.images, emb.captions, emb.lengths, pi, pc).float()
    n, m = cos.shape
    union = pi * m + pc                                  # sorted: nonzero() is row-major
    rows = torch.arange(n, device=cos.device).unsqueeze(1)
    cols = torch.arange(m, device=cos.device).unsqueeze(0)
    return TwoStageParts(cos, i2t_top, t2i_top, exact[torch.searchsorted(union, rows * m + i2t_top)],
                         exact[torch.searchsorted(union, t2i_top * m + cols)], int(pi.numel()), img_vecs, cap_vecs)


@torch.inference_mode()
def two_stage_matrices(parts: TwoStageParts, fusion: float = 0.0, *,
                       consume: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Two-stage score matrices ``(i2t_sims (n, m), t2i_sims (n, m))`` of ``parts`` under ``fusion``.

    Each image query ranks its own shortlisted captions by :func:`reranked_score` (offset above the
    rest), every other caption by cosine; likewise each caption query over the images. ``i2t_sims``
    ranks captions per row, ``t2i_sims`` images per column. ``consume``: reuse ``parts.cos``'s
    memory (it is then spent).
    """
    cos = parts.cos
    offset = OFFSET + fusion                             # fused scores lie in (-fusion, 1 + fusion)
    i2t_final = reranked_score(parts.i2t_exact, cos.gather(1, parts.i2t_top), fusion) + offset
    t2i_final = reranked_score(parts.t2i_exact, cos.gather(0, parts.t2i_top), fusion) + offset
    i2t_sims = cos - OFFSET
    i2t_sims.scatter_(1, parts.i2t_top, i2t_final)
    t2i_sims = cos.sub_(OFFSET) if consume else cos - OFFSET
    t2i_sims.scatter_(0, parts.t2i_top, t2i_final)
    return i2t_sims.cpu().numpy(), t2i_sims.cpu().numpy()


@torch.inference_mode()
def two_stage_scores(model, emb, k: int, fusion: float = 0.0
                     ) -> Tuple[np.ndarray, np.ndarray, int, torch.Tensor, torch.Tensor]:
    """Two-stage score matrices of an encoded block (:class:`vsl.runtime.Embeddings`, n images x m captions).

    :func:`two_stage_parts` then :func:`two_stage_matrices` under ``fusion``. Returns ``(i2t_sims
    (n, m), t2i_sims (n, m), pairs scored, image vectors (n, D), caption vectors (m, D))``.
    """
    parts = two_stage_parts(model, emb, k)
    i2t_sims, t2i_sims = two_stage_matrices(parts, fusion, consume=True)
    return i2t_sims, t2i_sims, parts.pairs, parts.image_vecs, parts.caption_vecs


#: Elements of the largest (lambdas, queries, K) block of :func:`fused_ranks`.
FUSED_BLOCK = 1 << 24


@torch.inference_mode()
def fused_ranks(parts: TwoStageParts, fusions: Sequence[float], captions_per_image: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Every query's 0-based rank of its match in the two-stage ranking, for each weight in ``fusions``.

    Returns ``(i2t (G, n), t2i (G, m))`` int64 for G weights: the rank of each image's best own
    caption and of each caption's image, as :func:`vsl.metrics.i2t` / :func:`vsl.metrics.t2i` read
    them off :func:`two_stage_matrices` (up to exact ties), without building a matrix per weight.
    A query whose match is outside its shortlist ranks it after all K shortlisted items, by cosine
    whatever the weight: that rank is read once from the lambda = 0 matrices. A query whose match
    is shortlisted ranks it after the shortlisted items whose fused score is higher.
    """
    from . import metrics

    cpi = captions_per_image
    plain_i2t, plain_t2i = two_stage_matrices(parts, 0.0)
    base_i2t, base_t2i = metrics.i2t(plain_i2t, cpi)[1][0], metrics.t2i(plain_t2i, cpi)[1][0]
    del plain_i2t, plain_t2i
    n, m = parts.cos.shape
    lam = torch.as_tensor(np.asarray(fusions, dtype=np.float32), device=parts.cos.device)
    i2t_cos, t2i_cos = parts.cos.gather(1, parts.i2t_top), parts.cos.gather(0, parts.t2i_top)
    i2t_own = parts.i2t_top // cpi == torch.arange(n, device=lam.device).unsqueeze(1)           # (n, k_c)
    t2i_own = parts.t2i_top == (torch.arange(m, device=lam.device) // cpi).unsqueeze(0)         # (k_i, m)
    step = max(1, FUSED_BLOCK // max(1, i2t_cos.numel(), t2i_cos.numel()))
    out_i2t, out_t2i = [], []
    for g in range(0, len(lam), step):                   # blocks of weights, each a batched op
        w = lam[g:g + step].view(-1, 1, 1)
        fused = parts.i2t_exact + w * i2t_cos                                                  # (g, n, k_c)
        best = fused.masked_fill(~i2t_own, float("-inf")).amax(dim=2, keepdim=True)         # (g, n, 1)
        out_i2t.append((fused > best).sum(dim=2))
        fused = parts.t2i_exact + w * t2i_cos                                                  # (g, k_i, m)
        best = fused.masked_fill(~t2i_own, float("-inf")).amax(dim=1, keepdim=True)         # (g, 1, m)
        out_t2i.append((fused > best).sum(dim=1))
    i2t_in = torch.cat(out_i2t).cpu().numpy()
    t2i_in = torch.cat(out_t2i).cpu().numpy()
    i2t = np.where(i2t_own.any(dim=1).cpu().numpy(), i2t_in, base_i2t)
    t2i = np.where(t2i_own.any(dim=0).cpu().numpy(), t2i_in, base_t2i)
    return i2t.astype(np.int64), t2i.astype(np.int64)
