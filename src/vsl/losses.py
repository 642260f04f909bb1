"""Training objectives: the hardest-negative triplet loss of SGRAF and the Visual Semantic Loss.

Both losses take a square score matrix ``scores`` of shape (B, B) whose rows are images and whose
columns are captions of one mini-batch; ``scores[b, b]`` is a matching pair.

The Visual Semantic Loss (VSL) asks that the *soft rank* of every entry of the score matrix agree
with the soft rank of the same entry of a semantic matrix C (image-image similarity computed from
the images' captions). With soft ranks R(S) and R(C) of shape (B, B)::

    VSL = weight * (1 - mean(min(R(S), R(C)) / max(R(S), R(C))))

The soft rank is computed exactly as released (see :func:`soft_rank`), which is what produced the
published numbers. A B x B x B comparison tensor is needed; it is built in chunks of rows, and the
backward pass recomputes each chunk instead of keeping the whole tensor alive, so peak memory stays
at two chunk-sized buffers (8 MB in float32 at the default budget) for any batch size.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .config import VSL_RANKS
from .errors import ConfigError


#: Elements of the (rows, B, B) comparison tensor handled per chunk (float32: 4 MB per buffer).
#: Small chunks are also faster than large ones on CPU (measured: 1 << 20 beats 1 << 22 and 1 << 24).
SOFT_RANK_CHUNK_ELEMENTS = 1 << 20

#: Bound of the exponent in the released sigmoid: exp(clamp(-x / T, -50, 50)).
_EXP_CLAMP = 50.0


def _check_square(name: str, matrix: torch.Tensor) -> None:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square (B, B) matrix, got shape {tuple(matrix.shape)}")


def _check_variant(variant: str) -> None:
    if variant not in VSL_RANKS:
        raise ConfigError(f"vsl_rank must be one of {VSL_RANKS}, got {variant!r}")


# --------------------------------------------------------------------------------------------
# Triplet loss
# --------------------------------------------------------------------------------------------
def triplet_loss(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """Bidirectional hinge loss of SGRAF (``ContrastiveLoss``), summed over the batch.

    Args:
        scores: (B, B) image x caption scores, diagonal = matching pairs.
        margin: hinge margin.
        max_violation: keep only the hardest negative per positive (VSE++); otherwise sum the hinge
            over all negatives.

    Returns:
        A scalar: sum over images of the caption-retrieval cost plus sum over captions of the
        image-retrieval cost.
    """
    _check_square("scores", scores)
    positive = scores.diagonal()
    # cost_s[i, j]: caption j ranked above image i's own caption (caption retrieval, row i).
    cost_s = (margin + scores - positive[:, None]).clamp(min=0)
    # cost_im[i, j]: image i ranked above caption j's own image (image retrieval, column j).
    cost_im = (margin + scores - positive[None, :]).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation:
        # .max (not .amax) routes the gradient to one arg-max, as the published code does.
        cost_s = cost_s.max(dim=1).values
        cost_im = cost_im.max(dim=0).values
    return cost_s.sum() + cost_im.sum()


class TripletLoss(nn.Module):
    """:func:`triplet_loss` with its options held by the module."""

    def __init__(self, margin: float = 0.2, max_violation: bool = True):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return triplet_loss(scores, self.margin, self.max_violation)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}"


# --------------------------------------------------------------------------------------------
# Soft rank
# --------------------------------------------------------------------------------------------
def _compared(matrix: torch.Tensor, variant: str) -> torch.Tensor:
    """The matrix whose row j holds the values that entry [j, k] is ranked against.

    released:  row j = column j of M (``M[i, j]`` over i).
    per-image: row j = row j of M (``M[j, i]`` over i).
    """
    return matrix.t() if variant == "released" else matrix


def _chunk_rows(batch: int, chunk_elements: int) -> int:
    return max(1, min(batch, chunk_elements // max(1, batch * batch)))


class _SoftRank(torch.autograd.Function):
    """R[j, k] = 1 + sum_{i != k} sig(A[j, i] - M[j, k]) with A = _compared(M), chunked over j.

    sig(x) = 1 / (1 + exp(clamp(-x / T, -50, 50))) = sigmoid(clamp(x / T, -50, 50)).
    Backward recomputes each chunk rather than saving it: d sig / dx = sig (1 - sig) / T. Outside
    the clamp the exact derivative is 0 while sig (1 - sig) / T < 2e-19, so no mask is kept.
    """

    @staticmethod
    def _sigmoid_chunk(compared: torch.Tensor, matrix: torch.Tensor, lo: int, hi: int,
                       temperature: float) -> torch.Tensor:
        """(hi - lo, B, B) tensor sig[j, i, k] for rows j in [lo, hi), with the i == k term zeroed."""
        # Subtract before dividing by T: with T = 0.001, pre-scaled operands (~1e3) would lose the
        # float32 precision of small differences, which is where the sigmoid is steep.
        sig = compared[lo:hi, :, None] - matrix[lo:hi, None, :]
        sig.div_(temperature).clamp_(-_EXP_CLAMP, _EXP_CLAMP).sigmoid_()
        sig.diagonal(dim1=1, dim2=2).zero_()
        return sig

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, temperature: float, variant: str, chunk_elements: int):
        batch = matrix.shape[0]
        compared = _compared(matrix, variant)
        rank = torch.empty_like(matrix)
        step = _chunk_rows(batch, chunk_elements)
        for lo in range(0, batch, step):
            hi = min(batch, lo + step)
            rank[lo:hi] = _SoftRank._sigmoid_chunk(compared, matrix, lo, hi, temperature).sum(dim=1).add_(1.0)
        ctx.save_for_backward(matrix)
        ctx.options = (temperature, variant, chunk_elements)
        return rank

    @staticmethod
    def backward(ctx, grad_rank: torch.Tensor):
        (matrix,) = ctx.saved_tensors
        temperature, variant, chunk_elements = ctx.options
        batch = matrix.shape[0]
        compared = _compared(matrix, variant)
        weight = grad_rank / temperature                    # dL/dR[j, k] times d(x / T)/dx
        grad_compared = torch.empty_like(matrix)            # dL/dA[j, i]
        grad_matrix = torch.empty_like(matrix)              # dL/dM[j, k], direct term
        step = _chunk_rows(batch, chunk_elements)
        for lo in range(0, batch, step):
            hi = min(batch, lo + step)
            sig = _SoftRank._sigmoid_chunk(compared, matrix, lo, hi, temperature)
            slope = sig.mul_(1.0 - sig)                     # sig (1 - sig); i == k stays 0
            # A[j, i] enters x[j, i, k] with + sign: sum over k of slope * weight[j, k] (a matvec).
            grad_compared[lo:hi] = torch.bmm(slope, weight[lo:hi, :, None]).squeeze(2)
            # M[j, k] enters with - sign: sum over i.
            grad_matrix[lo:hi] = -weight[lo:hi] * slope.sum(dim=1)
        grad_matrix += grad_compared.t() if variant == "released" else grad_compared
        return grad_matrix, None, None, None


def soft_rank(matrix: torch.Tensor, temperature: float = 0.001, variant: str = "released",
              chunk_elements: Optional[int] = None) -> torch.Tensor:
    """Differentiable rank of every entry of a square matrix, as in the released VSL code.

    Args:
        matrix: (B, B) scores S or semantic similarities C.
        temperature: T of the sigmoid; as T -> 0 the soft rank becomes the hard rank.
        variant: ``"released"``: R[j, k] = 1 + sum_{i != k} sig(M[i, j] - M[j, k]) (entry [j, k]
            ranked against column j, which is what the published code does; for a symmetric M it
            is the rank of k among all items by similarity to j).
            ``"per-image"``: R[j, k] = 1 + sum_{i != k} sig(M[j, i] - M[j, k]) (rank of caption k
            among all captions for image j, as the paper's figure describes).
        chunk_elements: memory budget, in elements, of one chunk of the (rows, B, B) comparison;
            None = :data:`SOFT_RANK_CHUNK_ELEMENTS`.

    Returns:
        (B, B) soft ranks in [1, B]; hard rank = 1 + #{i != k : compared value > M[j, k]}.
    """
    _check_square("matrix", matrix)
    _check_variant(variant)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not matrix.is_floating_point():
        matrix = matrix.float()
    if chunk_elements is None:
        chunk_elements = SOFT_RANK_CHUNK_ELEMENTS
    return _SoftRank.apply(matrix, float(temperature), variant, int(chunk_elements))


# --------------------------------------------------------------------------------------------
# Visual (and textual) semantic loss
# --------------------------------------------------------------------------------------------
def visual_semantic_loss(scores: torch.Tensor, image_semantic: torch.Tensor, weight: float = 10.0,
                         temperature: float = 0.001, variant: str = "released") -> torch.Tensor:
    """VSL = weight * (1 - mean(min(R(S), R(C)) / max(R(S), R(C)))).

    Args:
        scores: (B, B) image x caption scores S.
        image_semantic: (B, B) image-image semantic similarity C (no gradient is needed).
        weight, temperature, variant: see :func:`soft_rank`.

    Returns:
        A scalar; 0 when S and C induce the same ranks.
    """
    _check_square("scores", scores)
    if image_semantic.shape != scores.shape:
        raise ValueError(f"semantic matrix must have the shape of scores {tuple(scores.shape)}, "
                         f"got {tuple(image_semantic.shape)}")
    rank_scores = soft_rank(scores, temperature, variant)
    rank_semantic = soft_rank(image_semantic.to(scores.dtype), temperature, variant)
    agreement = torch.minimum(rank_scores, rank_semantic) / torch.maximum(rank_scores, rank_semantic)
    return weight * (1.0 - agreement.mean())


def textual_semantic_loss(scores: torch.Tensor, caption_semantic: torch.Tensor, weight: float = 10.0,
                          temperature: float = 0.001, variant: str = "released") -> torch.Tensor:
    """The textual counterpart of VSL (the paper's ablation): rank images for each caption.

    The same loss is applied to ``scores.t()`` (caption x image) with the caption-caption semantic
    matrix, so that with ``variant="per-image"`` R(S^T)[j, k] is the rank of image k among all
    images for caption j, matched against the rank of caption k by similarity to caption j.

    Args:
        scores: (B, B) image x caption scores.
        caption_semantic: (B, B) caption-caption semantic similarity.
    """
    return visual_semantic_loss(scores.t(), caption_semantic, weight, temperature, variant)


class VisualSemanticLoss(nn.Module):
    """:func:`visual_semantic_loss` with its options held by the module."""

    def __init__(self, weight: float = 10.0, temperature: float = 0.001, variant: str = "released"):
        super().__init__()
        _check_variant(variant)
        self.weight = weight
        self.temperature = temperature
        self.variant = variant

    def forward(self, scores: torch.Tensor, image_semantic: torch.Tensor) -> torch.Tensor:
        return visual_semantic_loss(scores, image_semantic, self.weight, self.temperature, self.variant)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, variant={self.variant!r}"


class VSLObjective(nn.Module):
    """The full training objective: triplet loss + VSL (+ the textual semantic loss if asked).

    ``vsl_weight=0`` gives the pure triplet baseline (SGR*/SAF* of the ablation tables). The textual
    loss uses the same weight, temperature and rank variant as the visual one.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, vsl_weight: float = 10.0,
                 temperature: float = 0.001, vsl_rank: str = "released", textual: bool = False):
        super().__init__()
        _check_variant(vsl_rank)
        self.triplet = TripletLoss(margin, max_violation)
        self.semantic = VisualSemanticLoss(vsl_weight, temperature, vsl_rank)
        self.textual = textual

    def forward(self, scores: torch.Tensor, image_semantic: Optional[torch.Tensor] = None,
                caption_semantic: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """scores (B, B); image_semantic / caption_semantic (B, B) or None.

        Returns a dict of scalars: ``loss`` (total), ``triplet``, ``vsl`` and, when ``textual``,
        ``tsl``. A semantic term is a zero tensor when its weight is 0 or its matrix is missing.
        """
        zero = scores.new_zeros(())
        active = self.semantic.weight != 0
        out = {"triplet": self.triplet(scores)}
        out["vsl"] = self.semantic(scores, image_semantic) if active and image_semantic is not None else zero
        total = out["triplet"] + out["vsl"]
        if self.textual:
            # The textual loss ranks images per caption: the transposed score matrix.
            out["tsl"] = (self.semantic(scores.t(), caption_semantic)
                          if active and caption_semantic is not None else zero)
            total = total + out["tsl"]
        out["loss"] = total
        return out
