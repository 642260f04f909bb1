"""Image and text encoders of SGR/SAF (the SCAN lineage).

``ImageEncoder``: one linear layer per precomputed region feature, l2-normalised.
``TextEncoder``: word embedding -> dropout -> (bi-)GRU, the two directions averaged, l2-normalised
per word. Parameter names match the published checkpoints (``fc.*``, ``embed.*``, ``cap_rnn.*``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` along ``dim``; the eps placement is the published one (zeros stay zeros)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def l1norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``x / (sum |x| + eps)`` along ``dim``."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def xavier_uniform_(linear: nn.Linear) -> None:
    """Published initialisation: U(-r, r), r = sqrt(6 / (fan_in + fan_out)), zero bias."""
    r = math.sqrt(6.0) / math.sqrt(linear.in_features + linear.out_features)
    nn.init.uniform_(linear.weight, -r, r)
    nn.init.zeros_(linear.bias)


class ImageEncoder(nn.Module):
    """Region features ``(n, R, img_dim)`` -> region embeddings ``(n, R, embed_size)``."""

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False):
        super().__init__()
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        xavier_uniform_(self.fc)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.fc(images)
        return emb if self.no_imgnorm else l2norm(emb, dim=-1)


class TextEncoder(nn.Module):
    """Word ids ``(m, L)`` with lengths ``(m,)`` -> word embeddings ``(m, L, embed_size)``.

    Captions may come in any order (no sorting needed); rows past a caption's length are zero.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 bi_gru: bool = True, no_txtnorm: bool = False, dropout: float = 0.4):
        super().__init__()
        self.embed_size = embed_size
        self.bi_gru = bi_gru
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(dropout)
        self.cap_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        words = self.dropout(self.embed(captions))
        lengths_cpu = torch.as_tensor(lengths).to("cpu", torch.int64)
        packed = pack_padded_sequence(words, lengths_cpu, batch_first=True, enforce_sorted=False)
        out, _ = self.cap_rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=captions.size(1))
        if self.bi_gru:
            out = (out[..., : self.embed_size] + out[..., self.embed_size:]) / 2
        return out if self.no_txtnorm else l2norm(out, dim=-1)
