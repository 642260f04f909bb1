"""The retrieval model: image encoder + text encoder + SGR/SAF similarity head, built from a Config."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..config import Config
from ..errors import CheckpointError
from .encoders import ImageEncoder, TextEncoder
from .shortlist import ShortlistHead
from .similarity import SimilarityEncoder, default_chunk_elements


class VSLModel(nn.Module):
    """SGR or SAF retrieval model.

    Submodules ``img_enc``, ``txt_enc`` and ``sim_enc`` hold exactly the parameters of the three
    state dicts of a published checkpoint, in that order. ``shortlist`` is the optional shortlist
    head (``config.shortlist_dim > 0``; None otherwise), built after them so that the three are
    initialised exactly as without it.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.img_enc = ImageEncoder(config.img_dim, config.embed_size, config.no_imgnorm)
        self.txt_enc = TextEncoder(config.vocab_size, config.word_dim, config.embed_size, config.num_layers,
                                   config.bi_gru, config.no_txtnorm)
        self.sim_enc = SimilarityEncoder(config.embed_size, config.sim_dim, config.module_name, config.sgr_step,
                                         config.num_regions)
        self.shortlist = (ShortlistHead(config.embed_size, config.shortlist_dim, config.shortlist_hidden)
                          if config.shortlist_dim else None)

    @property
    def device(self) -> torch.device:
        return self.img_enc.fc.weight.device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, R, img_dim)`` float32 -> ``(n, R, embed_size)``."""
        return self.img_enc(images)

    def encode_captions(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(m, L)`` int64 ids and ``(m,)`` lengths (any order) -> ``(m, L, embed_size)``, padding rows 0."""
        return self.txt_enc(captions, lengths)

    def encode_images_global(self, images: torch.Tensor) -> torch.Tensor:
        """Shortlist vectors of raw region features: ``(n, R, img_dim)`` -> ``(n, shortlist_dim)``, l2-normalised."""
        return self._head().images(self.encode_images(images))

    def encode_captions_global(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Shortlist vectors of captions: ``(m, L)`` ids, ``(m,)`` lengths -> ``(m, shortlist_dim)``, l2-normalised."""
        lengths = torch.as_tensor(lengths)
        return self._head().captions(self.encode_captions(captions, lengths), lengths.to(self.device))

    def _head(self) -> ShortlistHead:
        if self.shortlist is None:
            raise CheckpointError("this model has no shortlist head; fit one with `vsl fit-shortlist` "
                                  "(or train with --shortlist_weight)")
        return self.shortlist

    def similarity(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor,
                   chunk_elements: Optional[int] = None,
                   progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """All-pairs scores ``(n, m)`` of image embeddings ``(n, R, d)`` and caption embeddings ``(m, L, d)``."""
        chunk = chunk_elements if chunk_elements is not None else self.config.score_chunk
        return self.sim_enc(img_emb, cap_emb, lengths, chunk_elements=chunk, progress=progress)

    def chunk_budget(self) -> int:
        """Elements per scoring chunk: ``config.score_chunk``, else the automatic budget of this device."""
        return self.config.score_chunk or default_chunk_elements(self.device, self.config.embed_size)

    def set_statistics_gather(self, gather: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Distributed training: let SAF's running BatchNorm statistics see the captions of all ranks.

        ``gather``: ``(3, b)`` per-caption (mean, var, count) of this rank -> ``(3, B)`` of all
        ranks in global order; ``None`` = this process alone.
        """
        self.sim_enc.stats_gather = gather

    def forward(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores ``(n, m)`` of raw region features ``(n, R, img_dim)`` against captions ``(m, L)``."""
        lengths = torch.as_tensor(lengths)
        return self.similarity(self.encode_images(images), self.encode_captions(captions, lengths), lengths)


def build_model(config: Config) -> VSLModel:
    """The one factory: a freshly initialised model for ``config``."""
    return VSLModel(config)
