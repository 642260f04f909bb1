"""The explanation of a match is the exact model's own attention: its contexts are the scorer's."""
from __future__ import annotations

import torch

from vsl.config import Config
from vsl.models import build_model
from vsl.models.encoders import l2norm
from vsl.models.explain import explain_pairs, word_region_attention
from vsl.models.similarity import scan_text_to_image_attention


def _embeddings(P=3, R=5, L=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(P, R, d, generator=g))
    lengths = torch.tensor([7, 4, 2])[:P]
    words = l2norm(torch.randn(P, L, d, generator=g))
    words = words * (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
    return images, words, lengths


def test_weights_reproduce_the_scorers_contexts():
    images, words, lengths = _embeddings()
    weights = word_region_attention(images, words, lengths)                  # (P, L, R)
    contexts = l2norm(torch.bmm(weights, images))                             # (P, L, d)
    with torch.no_grad():
        all_pairs = scan_text_to_image_attention(images, words)               # (n, m, L, d)
    for p, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(contexts[p, :length], all_pairs[p, p, :length], atol=1e-6, rtol=1e-5)


def test_rows_sum_to_one_and_padding_is_zero():
    images, words, lengths = _embeddings()
    weights = word_region_attention(images, words, lengths)
    assert (weights >= 0).all()
    for p, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(weights[p, :length].sum(-1), torch.ones(length))
        assert torch.count_nonzero(weights[p, length:]) == 0


def test_the_word_that_matches_a_region_attends_to_it():
    d, R = 8, 4
    images = torch.eye(d)[:R].unsqueeze(0)                                    # region r = basis vector r
    words = torch.stack([torch.eye(d)[2], torch.eye(d)[0]]).unsqueeze(0)      # word 0 ~ region 2, word 1 ~ region 0
    weights = word_region_attention(images, words, torch.tensor([2]))
    assert weights[0].argmax(-1).tolist() == [2, 0]


def test_explain_pairs_runs_the_model_in_eval_mode_and_restores_it():
    config = Config(vocab_size=20, word_dim=8, embed_size=16, sim_dim=8, img_dim=12, num_regions=5)
    model = build_model(config).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 5, 12, generator=g)
    captions = torch.randint(1, 20, (2, 6), generator=g)
    lengths = torch.tensor([6, 3])
    a = explain_pairs(model, images, captions, lengths)
    b = explain_pairs(model, images, captions, lengths)
    assert a.shape == (2, 6, 5) and model.training
    torch.testing.assert_close(a, b)          # dropout off: deterministic
