import math
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from vsl.data.semantics import (
    CiderSemantics,
    TfidfSemantics,
    build_semantics,
    caption_semantic_from_rows,
    cider_tokens,
    image_semantic_from_rows,
)
from vsl.errors import ConfigError


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return dict(np.load(fixtures_dir / "loss_parity.npz"))


# -- golden values of the published code -------------------------------------------------------
def test_image_semantic_matches_published(golden):
    rows = golden["tfidf_image"]                                    # (12, 5, 30)
    expected = golden["image_semantic"]
    np.testing.assert_allclose(image_semantic_from_rows(rows), expected, rtol=0, atol=1e-6)
    sparse = sp.csr_matrix(rows.reshape(-1, rows.shape[-1]))
    np.testing.assert_allclose(image_semantic_from_rows(sparse, captions_per_image=5), expected, rtol=0, atol=1e-6)
    assert image_semantic_from_rows(rows).dtype == np.float32


def test_caption_semantic_matches_published(golden):
    expected = golden["caption_semantic"]
    np.testing.assert_allclose(caption_semantic_from_rows(golden["tfidf_caption"]), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(caption_semantic_from_rows(sp.csr_matrix(golden["tfidf_caption"])), expected,
                               rtol=0, atol=1e-6)


def test_from_rows_are_cosines_of_unnormalised_rows(golden):
    rows = golden["tfidf_image"] * np.random.default_rng(0).uniform(0.5, 3.0, size=(12, 5, 1))
    np.testing.assert_allclose(image_semantic_from_rows(rows), golden["image_semantic"], atol=1e-6)
    zero = np.zeros((2, 4))
    assert np.array_equal(caption_semantic_from_rows(zero), np.zeros((2, 2)))   # no NaN for empty captions


# -- TF-IDF on a split ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_captions():
    rng = np.random.default_rng(1)
    words = np.array("a man woman dog cat riding sitting on the bench surfboard wave red blue of".split())
    return [" ".join(rng.choice(words, size=rng.integers(1, 9))) + " ." for _ in range(60)]   # 12 images x 5


def dense_reference(captions, caption_ids, per_image):
    """The published computation: a dense TF-IDF matrix and explicit loops over caption pairs."""
    dense = TfidfVectorizer().fit_transform(captions).toarray()
    b = len(caption_ids)
    image, caption = np.zeros((b, b)), np.zeros((b, b))
    for i, ci in enumerate(caption_ids):
        for j, cj in enumerate(caption_ids):
            caption[i, j] = dense[ci] @ dense[cj]
            ii, jj = ci // per_image, cj // per_image
            image[i, j] = np.mean([dense[ii * per_image + a] @ dense[jj * per_image + c]
                                   for a in range(per_image) for c in range(per_image)])
    return image, caption


def test_tfidf_semantics_matches_dense_published_computation(toy_captions):
    semantics = build_semantics("tfidf", toy_captions, 5)
    assert isinstance(semantics, TfidfSemantics)
    assert sp.isspmatrix_csr(semantics.tfidf) and semantics.tfidf.dtype == np.float32
    ids = np.array([7, 3, 59, 12, 8, 33, 34, 0])                    # includes two captions of one image
    image, caption = dense_reference(toy_captions, ids, 5)
    np.testing.assert_allclose(semantics.image_semantic(ids, 5), image, atol=1e-6)
    np.testing.assert_allclose(semantics.caption_semantic(ids), caption, atol=1e-6)
    assert semantics.image_semantic(ids, 5)[4, 0] == pytest.approx(semantics.image_semantic(ids, 5)[0, 0])


def test_tfidf_one_caption_per_image_is_caption_cosine(toy_captions):
    semantics = build_semantics("tfidf", toy_captions, 1)
    ids = np.array([5, 1, 40, 22])
    np.testing.assert_array_equal(semantics.image_semantic(ids, 1), semantics.caption_semantic(ids))
    np.testing.assert_allclose(np.diag(semantics.caption_semantic(ids)), 1.0, atol=1e-6)


def test_tfidf_on_real_captions(shared_data_dir):
    lines = (shared_data_dir / "coco_precomp" / "dev_caps.txt").read_text(encoding="utf-8").splitlines()
    semantics = build_semantics("tfidf", lines, 5)
    ids = np.random.default_rng(0).choice(len(lines), 32, replace=False)
    image, caption = dense_reference(lines, ids, 5)
    np.testing.assert_allclose(semantics.image_semantic(ids, 5), image, atol=1e-6)
    np.testing.assert_allclose(semantics.caption_semantic(ids), caption, atol=1e-6)


# -- CIDEr-D -------------------------------------------------------------------------------------
def test_cider_hand_computed_tiny_corpus():
    """Three images with one caption each: "cat sat", "cat ran", "dog ran ran"."""
    semantics = build_semantics("cider", ["Cat sat.", "cat ran", "dog ran ran"], 1)
    assert isinstance(semantics, CiderSemantics)
    l2, l3 = math.log(3), math.log(3 / 2)       # weights: df 1 -> log 3, df 2 -> log 3 - log 2
    # cat/ran are in 2 of 3 images, sat/dog and every bigram in 1.
    # "cat sat" vs "cat ran": unigrams share "cat" (l3^2) over norms sqrt(l3^2 + l2^2) and sqrt(2 l3^2);
    # no shared bigram; no 3/4-grams; same length.
    sim_01 = 10 * (l3 ** 2 / (math.sqrt(l3 ** 2 + l2 ** 2) * math.sqrt(2 * l3 ** 2))) / 4
    # hypothesis "cat ran" vs reference "dog ran ran": unigram "ran" clipped min(1, 2) * 2 * l3^2, the
    # reference unigram norm sqrt(l2^2 + (2 l3)^2); bigram "ran ran"/"dog ran" vs "cat ran": none shared;
    # lengths 2 vs 3 -> penalty exp(-1/72).
    sim_12 = 10 * math.exp(-1 / 72) * (2 * l3 ** 2 / (math.sqrt(l3 ** 2 + l3 ** 2) * math.sqrt(l2 ** 2 + 4 * l3 ** 2))) / 4
    # and the other way round the clip is min(2, 1) * 1
    sim_21 = 10 * math.exp(-1 / 72) * (1 * l3 ** 2 / (math.sqrt(l3 ** 2 + l3 ** 2) * math.sqrt(l2 ** 2 + 4 * l3 ** 2))) / 4
    # self-similarity: every non-empty n-gram order scores 1 (2 of 4 orders for two words, 3 for three)
    expected = np.array([[5.0, sim_01, 0.0],
                         [sim_01, 5.0, sim_12],
                         [0.0, sim_21, 7.5]])
    got = semantics.caption_semantic(np.array([0, 1, 2]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(semantics.image_semantic(np.array([0, 1, 2]), 1), expected, rtol=1e-6)


def cider_reference(captions, per_image):
    """CIDEr-D written out as in the captioning metric, with dictionaries (max n 4, sigma 6, x10):
    returns score(hypothesis caption, reference captions)."""
    def ngrams(words):
        return Counter(tuple(words[i:i + n]) for n in range(1, 5) for i in range(len(words) - n + 1))

    tokens = [cider_tokens(c) for c in captions]
    counts = [ngrams(t) for t in tokens]
    num_images = len(captions) // per_image
    df = Counter(g for i in range(num_images)
                 for g in set().union(*counts[i * per_image:(i + 1) * per_image]))
    ref_len = math.log(num_images)

    def vec(c):
        v = [dict() for _ in range(4)]
        for g, tf in counts[c].items():
            v[len(g) - 1][g] = tf * (ref_len - math.log(max(1.0, df[g])))
        return v, [math.sqrt(sum(x * x for x in d.values())) for d in v]

    def score(hyp, refs):
        vh, nh = vec(hyp)
        total = 0.0
        for r in refs:
            vr, nr = vec(r)
            delta = len(tokens[hyp]) - len(tokens[r])
            val = 0.0
            for n in range(4):
                s = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vh[n].items())
                if nh[n] and nr[n]:
                    s /= nh[n] * nr[n]
                val += s * math.exp(-delta ** 2 / (2 * 36.0))
            total += val / 4
        return 10 * total / len(refs)

    return score


def test_cider_matches_dictionary_reference(toy_captions):
    captions = toy_captions[:30] + ["a dog , a dog and a dog on the bench", "the the the cat", "a red red wave .",
                                    "man man man", "riding a wave on a surfboard"]
    captions = captions + captions[:5]                               # 8 images x 5
    semantics = CiderSemantics(5).fit(captions)
    ids = np.array([0, 31, 36, 12, 33, 17])
    cider = cider_reference(captions, 5)
    expected_caption = np.array([[cider(h, [r]) for r in ids] for h in ids])
    np.testing.assert_allclose(semantics.caption_semantic(ids), expected_caption, rtol=1e-5, atol=1e-6)
    images = ids // 5
    expected_image = np.array([[np.mean([cider(h, range(j * 5, j * 5 + 5))
                                         for h in range(i * 5, i * 5 + 5)]) for j in images] for i in images])
    np.testing.assert_allclose(semantics.image_semantic(ids, 5), expected_image, rtol=1e-5, atol=1e-6)


def test_build_semantics_rejects_unknown_kind():
    with pytest.raises(ConfigError, match="semantic must be one of"):
        build_semantics("bleu", ["a b"], 1)
