"""Caption-based semantic similarity between the images (and captions) of a batch, for VSL.

The Visual Semantic Loss ranks the images of a batch by how similar their captions are. Two measures:

* ``tfidf`` (as published): TF-IDF rows of all captions of the split, from scikit-learn's
  ``CountVectorizer`` + ``TfidfTransformer`` with default settings fitted on the raw caption
  strings. Image-image similarity = the mean of the K x K cosines between the two images'
  K (= 5) captions; caption-caption similarity = the cosine of the two captions.
* ``cider``: CIDEr-D (n-grams 1-4, document frequencies over the split's images, clipped term
  frequencies, Gaussian length penalty with sigma 6, x10), the measure the paper names.

Both keep the split's matrix sparse (566k COCO captions x 27k words would be 136 GB dense) and
compute a batch's B x B matrices from the batch's sparse rows only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

from ..config import SEMANTICS
from ..errors import ConfigError
from .vocab import tokenize

Rows = Union[np.ndarray, sp.spmatrix, sp.sparray]


# ---------------------------------------------------------------------------------------------
# Cosine similarities from TF-IDF rows (pure functions; the golden test calls these directly)
# ---------------------------------------------------------------------------------------------
def _unit_rows(rows: Rows) -> sp.csr_matrix:
    """``rows`` (n, V) as float64 CSR with unit l2 norm; all-zero rows stay zero (cosine 0)."""
    rows = sp.csr_matrix(rows, dtype=np.float64)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.diags(scale) @ rows


def caption_semantic_from_rows(rows: Rows) -> np.ndarray:
    """Cosine similarity of every pair of captions.

    rows: (B, V) TF-IDF rows, dense or sparse. Returns (B, B) float32.
    """
    unit = _unit_rows(rows)
    return (unit @ unit.T).toarray().astype(np.float32)


def image_semantic_from_rows(rows: Rows, captions_per_image: Optional[int] = None) -> np.ndarray:
    """Mean of the K x K cosines between the captions of every pair of images.

    rows: (B, K, V) dense, or (B*K, V) dense/sparse with image b's captions in rows b*K .. b*K+K-1
    (then ``captions_per_image`` = K is required). Returns (B, B) float32.

    The mean of the K^2 cosines equals the dot product of the two images' mean unit caption rows
    (bilinearity), so one (B, V) x (V, B) product does it.
    """
    rows_2d = rows
    if isinstance(rows, np.ndarray) and rows.ndim == 3:
        captions_per_image = rows.shape[1]
        rows_2d = rows.reshape(-1, rows.shape[2])
    elif captions_per_image is None:
        raise ValueError("captions_per_image is required when rows are (B*K, V)")
    k = int(captions_per_image)
    n = rows_2d.shape[0]
    if n % k:
        raise ValueError(f"{n} caption rows are not a multiple of {k} captions per image")
    unit = _unit_rows(rows_2d)
    # (B, B*K) averaging matrix: image b takes 1/K of each of its K captions.
    mean_of_captions = sp.csr_matrix((np.full(n, 1.0 / k), np.arange(n), np.arange(0, n + 1, k)),
                                     shape=(n // k, n))
    image_rows = mean_of_captions @ unit
    return (image_rows @ image_rows.T).toarray().astype(np.float32)


def _image_caption_ids(caption_ids: np.ndarray, captions_per_image: int) -> np.ndarray:
    """Ids of all K captions of the image of each caption: (B,) -> (B*K,), image-major."""
    images = np.asarray(caption_ids, dtype=np.int64) // captions_per_image
    return (images[:, None] * captions_per_image + np.arange(captions_per_image)).ravel()


class TfidfSemantics:
    """TF-IDF similarity, as published: sklearn ``CountVectorizer`` + ``TfidfTransformer`` defaults.

    ``TfidfSemantics(captions_per_image).fit(captions)``; then :meth:`image_semantic` and
    :meth:`caption_semantic` take the (B,) caption ids of a batch (indices into ``captions``).
    """

    kind = "tfidf"

    def __init__(self, captions_per_image: int = 5) -> None:
        self.captions_per_image = int(captions_per_image)
        self.tfidf: Optional[sp.csr_matrix] = None   # (num_captions, V) float32, unit rows

    def fit(self, captions: Sequence[str]) -> "TfidfSemantics":
        counts = CountVectorizer().fit_transform(captions)
        # float32 halves the split's matrix; the batch products are done in float64 again.
        self.tfidf = sp.csr_matrix(TfidfTransformer().fit_transform(counts), dtype=np.float32)
        self.tfidf.sort_indices()
        return self

    @property
    def num_captions(self) -> int:
        return self.tfidf.shape[0]

    def image_semantic(self, caption_ids: np.ndarray, captions_per_image: Optional[int] = None) -> np.ndarray:
        """(B,) caption ids -> (B, B) float32: mean of the K x K cosines of their images' captions."""
        k = int(captions_per_image or self.captions_per_image)
        return image_semantic_from_rows(self.tfidf[_image_caption_ids(caption_ids, k)], k)

    def caption_semantic(self, caption_ids: np.ndarray) -> np.ndarray:
        """(B,) caption ids -> (B, B) float32 cosines."""
        return caption_semantic_from_rows(self.tfidf[np.asarray(caption_ids, dtype=np.int64)])


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------
CIDER_MAX_N = 4
CIDER_SIGMA = 6.0


def cider_tokens(caption: str) -> List[str]:
    """Lowercased words of ``caption`` without punctuation tokens, as the captioning metric scores them."""
    return [t for t in tokenize(caption) if any(ch.isalnum() for ch in t)]


def _entries_at_least(counts: sp.csr_matrix, t: int, values: np.ndarray) -> sp.csr_matrix:
    """``values`` at the entries of ``counts`` that are >= t, zero elsewhere (not stored)."""
    keep = counts.data >= t
    if keep.all():
        return sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape)
    row_of_entry = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of_entry[keep], minlength=counts.shape[0]))])
    return sp.csr_matrix((values[keep], counts.indices[keep], indptr), shape=counts.shape)


class CiderSemantics:
    """CIDEr-D similarity between captions, with the document frequencies of the split.

    For a hypothesis caption h and a reference r, with n-gram count vectors g_n and
    weights w(g) = log(#images) - log(max(1, #images whose captions contain g)):

        sim_n(h, r) = sum_g min(c_h(g), c_r(g)) * c_r(g) * w(g)^2 / (|c_h w|_n * |c_r w|_n)
        cider(h, r) = 10 * exp(-(len_h - len_r)^2 / (2 * 6^2)) * mean_{n=1..4} sim_n(h, r)

    Image-image similarity is the mean over the K x K (hypothesis, reference) caption pairs of the
    two images, which is CIDEr-D of each caption of the first image against the captions of the
    second, averaged. The clipping ``min`` makes the matrices slightly asymmetric.
    Lengths are token counts (CIDEr-D's code counts bigrams; the difference is the same).
    """

    kind = "cider"

    def __init__(self, captions_per_image: int = 5, max_n: int = CIDER_MAX_N, sigma: float = CIDER_SIGMA) -> None:
        self.captions_per_image = int(captions_per_image)
        self.max_n = int(max_n)
        self.sigma = float(sigma)

    def fit(self, captions: Sequence[str]) -> "CiderSemantics":
        k = self.captions_per_image
        if len(captions) % k:
            raise ValueError(f"{len(captions)} captions are not a multiple of {k} captions per image")
        words = [" ".join(cider_tokens(c)) for c in captions]
        self.lengths = np.array([w.count(" ") + 1 if w else 0 for w in words], dtype=np.float64)
        vectorizer = CountVectorizer(tokenizer=str.split, token_pattern=None, lowercase=False,
                                     ngram_range=(1, self.max_n), dtype=np.float64)
        self.counts = vectorizer.fit_transform(words).tocsr()                 # (N, F) n-gram counts
        self.counts.sum_duplicates()   # canonical now, so that no later call reorders entries in place
        # n - 1 for each n-gram column
        self.column_order = np.char.count(vectorizer.get_feature_names_out().astype(str), " ")
        # Document frequency over images (a document = all captions of one image, as in CIDEr).
        num_images = len(captions) // k
        per_image = sp.csr_matrix((np.ones(len(captions)), np.arange(len(captions)),
                                   np.arange(0, len(captions) + 1, k)), shape=(num_images, len(captions)))
        document_frequency = (per_image @ self.counts).getnnz(axis=0)
        self.weights = np.log(float(num_images)) - np.log(np.maximum(1.0, document_frequency))
        # |c w|_n for each caption and order n: (N, max_n)
        order_indicator = sp.csr_matrix((np.ones(len(self.column_order)), self.column_order,
                                         np.arange(len(self.column_order) + 1)),
                                        shape=(len(self.column_order), self.max_n))
        weighted_sq = self.counts.multiply(self.counts).multiply(self.weights[None, :] ** 2).tocsr()
        self.norms = np.sqrt((weighted_sq @ order_indicator).toarray())
        return self

    @property
    def num_captions(self) -> int:
        return self.counts.shape[0]

    def _rows(self, caption_ids: np.ndarray) -> Tuple[sp.csr_matrix, np.ndarray]:
        """Count rows of ``caption_ids`` and, per stored entry, 1 / |c w|_n of its row and n-gram order."""
        rows = self.counts[caption_ids]
        rows.sum_duplicates()          # (a no-op for canonical rows) entries must not move after this
        row_of_entry = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
        norm = self.norms[caption_ids[row_of_entry], self.column_order[rows.indices]]
        return rows, np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)

    def similarity(self, hypothesis_ids: np.ndarray, reference_ids: np.ndarray) -> np.ndarray:
        """CIDEr-D of each hypothesis caption against each reference caption: (H,) x (R,) -> (H, R) float64."""
        hypothesis_ids = np.asarray(hypothesis_ids, dtype=np.int64)
        reference_ids = np.asarray(reference_ids, dtype=np.int64)
        hyp, hyp_scale = self._rows(hypothesis_ids)
        ref, ref_scale = self._rows(reference_ids)
        ref_scale = ref_scale * ref.data * self.weights[ref.indices] ** 2       # c_r(g) w(g)^2 / |c_r w|_n
        # Dividing every entry by the norm of its own order turns the sum over all n-gram columns into
        # sum_n sim_n, so one product covers the four orders. The clipped numerator uses
        # min(a, b) = sum_{t >= 1} [a >= t][b >= t] for counts a, b: t only runs to the largest count in
        # the batch (usually 2-3), and entries below t drop out of the sparse factors.
        total = sp.csr_matrix((len(hypothesis_ids), len(reference_ids)))
        largest = max(hyp.data.max(initial=0), ref.data.max(initial=0))
        for t in range(1, int(largest) + 1):
            total = total + _entries_at_least(hyp, t, hyp_scale) @ _entries_at_least(ref, t, ref_scale).T
        delta = self.lengths[hypothesis_ids][:, None] - self.lengths[reference_ids][None, :]
        penalty = np.exp(-(delta ** 2) / (2.0 * self.sigma ** 2))
        return (10.0 / self.max_n) * penalty * total.toarray()

    def image_semantic(self, caption_ids: np.ndarray, captions_per_image: Optional[int] = None) -> np.ndarray:
        """(B,) caption ids -> (B, B) float32: mean CIDEr-D over the K x K caption pairs of their images."""
        k = int(captions_per_image or self.captions_per_image)
        ids = _image_caption_ids(caption_ids, k)
        b = len(ids) // k
        return self.similarity(ids, ids).reshape(b, k, b, k).mean(axis=(1, 3)).astype(np.float32)

    def caption_semantic(self, caption_ids: np.ndarray) -> np.ndarray:
        """(B,) caption ids -> (B, B) float32 CIDEr-D (row = hypothesis, column = reference)."""
        return self.similarity(caption_ids, caption_ids).astype(np.float32)


def build_semantics(kind: str, captions: Sequence[str], captions_per_image: int):
    """Fit the semantic measure ``kind`` ("tfidf" or "cider") on all captions of the split."""
    if kind == "tfidf":
        return TfidfSemantics(captions_per_image).fit(captions)
    if kind == "cider":
        return CiderSemantics(captions_per_image).fit(captions)
    raise ConfigError(f"semantic must be one of {SEMANTICS}, got {kind!r}")
