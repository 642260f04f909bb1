"""Why a caption matches an image: the exact model's text-to-image attention as weights over regions.

SGR and SAF both start from SCAN's text-to-image attention (:func:`vsl.models.similarity.
scan_text_to_image_attention`): every word of the caption attends over the image's regions, and the
attended context is what the word is compared with. The attention weights are therefore the model's
own answer to "which regions does this word look at"; :func:`word_region_attention` returns them for
(image, caption) pairs with the same arithmetic (leaky ReLU 0.1 of the cosine logits, l2-normalised
over the caption's words, times the smoothing 9, softmax over regions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .similarity import ATTENTION_SMOOTH


def word_region_attention(images: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor,
                          smooth: float = ATTENTION_SMOOTH) -> torch.Tensor:
    """Attention of each word of caption ``p`` over the regions of image ``p``.

    Args:
        images: ``(P, R, d)`` region embeddings (the model's ``encode_images``).
        words: ``(P, L, d)`` word embeddings of the caption paired with each image, padding rows 0
            (the model's ``encode_captions``).
        lengths: ``(P,)`` caption lengths.
    Returns:
        ``(P, L, R)`` weights; each real word's row sums to 1 over the regions, padding rows are 0.
    """
    logits = F.leaky_relu(torch.bmm(words, images.transpose(1, 2)), 0.1)            # (P, L, R)
    # The published normalisation runs over the caption's words for each region; padding words
    # are zero vectors, so their logits are 0 and add nothing to the norm.
    logits = logits * (smooth / (torch.linalg.vector_norm(logits, dim=1, keepdim=True) + 1e-8))
    weights = logits.softmax(dim=2)
    positions = torch.arange(words.size(1), device=words.device)
    real = positions.unsqueeze(0) < torch.as_tensor(lengths, device=words.device).unsqueeze(1)   # (P, L)
    return weights * real.unsqueeze(-1).to(weights.dtype)


@torch.no_grad()
def explain_pairs(model, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`word_region_attention` of a model on raw inputs, in eval mode.

    Args:
        model: a :class:`vsl.models.VSLModel`.
        images: ``(P, R, img_dim)`` region features.
        captions: ``(P, L)`` int64 word ids; ``lengths`` ``(P,)``.
    Returns:
        ``(P, L, R)`` attention weights (see :func:`word_region_attention`).
    """
    was_training = model.training
    model.eval()
    try:
        device = model.device
        lengths = torch.as_tensor(lengths)
        img = model.encode_images(images.to(device, torch.float32))
        cap = model.encode_captions(captions.to(device), lengths)
        return word_region_attention(img, cap, lengths.to(device))
    finally:
        model.train(was_training)
