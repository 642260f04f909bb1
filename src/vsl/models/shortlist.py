"""The shortlist head of two-stage retrieval: one global vector per image and per caption, and its loss.

The cross-attention scorers (SGR/SAF) see an image and a caption together, so they cannot index a
gallery. The shortlist head gives each side its own vector, compared by cosine (the inner product
of l2-normalised vectors), so that a vector index can propose the top K candidates that the exact
model then re-ranks:

* image: region embeddings ``(n, R, d)`` -> mean over regions ``(n, d)`` -> ``Linear(d, D)`` ->
  l2norm ``(n, D)``;
* caption: word embeddings ``(m, L, d)`` with lengths ``(m,)`` -> mean over the caption's own
  words ``(m, d)`` -> its own ``Linear(d, D)`` -> l2norm ``(m, D)``.

(A hidden ReLU layer before the projection was measured and did worse on the demo model: shortlist
recall@10 90.1/77.7 against 95.1/81.1 for the linear head, i2t/t2i, InfoNCE; the hinge loss did
worse than InfoNCE with either head, see the README's retrieval section.)

Both read the encoders' outputs, so a head can be fitted afterwards on a frozen checkpoint (the
published ones included) from pooled embeddings computed once. The head's loss is symmetric:
InfoNCE (softmax cross-entropy over the batch at a fixed temperature) or the VSE hinge (sum of the
violations of all negatives). Captions of the same image in one batch are not negatives of each
other. The head is optional: ``Config.shortlist_dim == 0`` builds none, and the paper's model,
objective and checkpoints are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import l2norm


def masked_mean(words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each caption's first ``lengths[j]`` word embeddings: ``(m, L, d)`` -> ``(m, d)``."""
    lengths = torch.as_tensor(lengths, device=words.device)
    mask = torch.arange(words.size(1), device=words.device) < lengths.unsqueeze(1)      # (m, L)
    total = (words * mask.unsqueeze(-1).to(words.dtype)).sum(dim=1)
    return total / lengths.clamp_min(1).unsqueeze(1).to(words.dtype)


class ShortlistHead(nn.Module):
    """Global vectors of images and captions for the vector shortlist.

    ``images(img_emb (n, R, d)) -> (n, D)``, ``captions(cap_emb (m, L, d), lengths (m,)) -> (m, D)``,
    both l2-normalised; ``pooled_images`` / ``pooled_captions`` take the pooled ``(., d)``
    embeddings instead (what :func:`vsl.retrieval.fit_shortlist` precomputes).
    """

    def __init__(self, embed_size: int, dim: int):
        super().__init__()
        self.dim = dim
        self.image_proj = nn.Linear(embed_size, dim)
        self.caption_proj = nn.Linear(embed_size, dim)

    def pooled_images(self, pooled: torch.Tensor) -> torch.Tensor:
        return l2norm(self.image_proj(pooled), dim=-1)

    def pooled_captions(self, pooled: torch.Tensor) -> torch.Tensor:
        return l2norm(self.caption_proj(pooled), dim=-1)

    def images(self, img_emb: torch.Tensor) -> torch.Tensor:
        return self.pooled_images(img_emb.mean(dim=1))

    def captions(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.pooled_captions(masked_mean(cap_emb, lengths))


def shortlist_loss(image_vecs: torch.Tensor, caption_vecs: torch.Tensor, image_ids: torch.Tensor, *,
                   loss: str = "infonce", temperature: float = 0.05, margin: float = 0.2) -> torch.Tensor:
    """Symmetric contrastive loss of a batch of B pairs (row b of both is a matching pair).

    Args:
        image_vecs, caption_vecs: ``(B, D)`` l2-normalised global vectors.
        image_ids: ``(B,)`` image index of each pair; other pairs of the same image are masked out
            (neither positive nor negative).
        loss: ``"infonce"`` (mean cross-entropy of both directions at ``temperature``) or
            ``"hinge"`` (sum over all negatives of ``max(0, margin + s_neg - s_pos)``, both directions,
            averaged over the batch).
    """
    sims = image_vecs @ caption_vecs.t()                                          # (B, B)
    same = image_ids.unsqueeze(0) == image_ids.unsqueeze(1)
    other_positive = same & ~torch.eye(len(image_ids), dtype=torch.bool, device=sims.device)
    if loss == "infonce":
        logits = (sims / temperature).masked_fill(other_positive, float("-inf"))
        target = torch.arange(len(image_ids), device=sims.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    if loss == "hinge":
        positive = sims.diagonal()
        negative = ~same
        cost_c = (margin + sims - positive[:, None]).clamp(min=0) * negative     # captions for image rows
        cost_i = (margin + sims - positive[None, :]).clamp(min=0) * negative     # images for caption columns
        return (cost_c.sum() + cost_i.sum()) / len(image_ids)
    raise ValueError(f"unknown shortlist loss {loss!r}")
