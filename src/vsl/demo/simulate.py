"""Region features simulated from real captions: a SCAN-layout dataset whose images are drawn from their words.

Real captions (5 per image, e.g. COCO's ``dev_caps.txt`` and ``testall_caps.txt``) keep their
words, their synonyms and their long tail; only the bottom-up-attention features are replaced.
Each content word of the vocabulary gets a visual prototype (a Gaussian vector). An image's
``num_regions`` regions are drawn from the content words of its own captions with probability
proportional to ``mentions ** main_power`` (``mentions``: how many of its captions name the word),
so that the words every annotator named (the main semantics) own most regions and a word named
once owns few or none; ``background_regions`` regions show one of a few shared backgrounds. Every
region is ``prototype + noise``, plus a per-image style offset, rectified like pooled CNN activations.

Images are shuffled once (by the seed) and split into train / dev / test; the vocabulary holds
the words of the train and dev captions that occur at least ``vocab_threshold`` times (the
published recipe). Everything is a function of :class:`SimSpec` and the caption files: the same
inputs give byte-identical files. Layout written under ``out_dir``::

    data/{data_name}/{train,dev,test}_ims.npy    float32, N x num_regions x img_dim
    data/{data_name}/{train,dev,test}_caps.txt   5N lines
    vocab/{data_name}_vocab.json
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
from scipy import sparse

from ..data import SPECIAL_TOKENS, Vocabulary, read_captions, tokenize
from ..errors import ConfigError, DataError
from ..fileio import atomic_write, atomic_write_text

PathLike = Union[str, os.PathLike]
CAPTIONS_PER_IMAGE = 5
SPLITS = ("train", "dev", "test")

#: Words that name nothing visible (articles, prepositions, auxiliaries, numbers, punctuation):
#: they get no regions. Everything else in the vocabulary is a content word.
FUNCTION_WORDS = frozenset("""
a an the of on in at to with and or is are be being was were it its it's this that these those
there their them they his her he she some very by for from as into onto near next while has
have having up down out over under front top side other each one two three four several many
s 's 'm not no just which who what where along around behind beside through about
""".split())


@dataclass(frozen=True)
class SimSpec:
    """Everything the simulated files depend on, besides the caption files."""

    seed: int = 0
    train_images: int = 4500
    dev_images: int = 500
    test_images: int = 1000
    img_dim: int = 128
    num_regions: int = 36
    background_regions: int = 6
    main_power: float = 2.0          # region share ~ mentions ** main_power
    feature_noise: float = 1.5       # std of per-region noise (prototypes have unit std)
    backgrounds: int = 8
    vocab_threshold: int = 4
    data_name: str = "cocosim_precomp"

    def __post_init__(self) -> None:
        for name in ("train_images", "dev_images", "test_images", "img_dim", "num_regions", "backgrounds",
                     "vocab_threshold"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"simulated data: {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.background_regions < self.num_regions:
            raise ConfigError(f"simulated data: background_regions must be in [0, num_regions), "
                              f"got {self.background_regions}")
        if not (self.feature_noise >= 0 and self.main_power >= 0):
            raise ConfigError("simulated data: feature_noise and main_power must be >= 0")

    def images(self, split: str) -> int:
        return int(getattr(self, f"{split}_images"))

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def _rng(spec: SimSpec, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=key))


def mention_matrix(captions: Sequence[str], vocab: Vocabulary) -> sparse.csr_matrix:
    """(images, len(vocab)) int CSR: how many of each image's captions name each content word."""
    content = np.array([word not in FUNCTION_WORDS and word not in SPECIAL_TOKENS and any(c.isalpha() for c in word)
                        for word in (vocab.idx2word[i] for i in range(len(vocab)))])
    ids = [[vocab(t) for t in tokenize(caption)] for caption in captions]
    cols = np.fromiter((i for caption in ids for i in caption), dtype=np.int64)
    rows = np.repeat(np.arange(len(captions)), [len(caption) for caption in ids])
    keep = content[cols]
    per_caption = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.int64), (rows[keep], cols[keep])),
                                    shape=(len(captions), len(vocab)))
    per_caption.data[:] = 1                                      # a word counts once per caption
    n = len(captions) // CAPTIONS_PER_IMAGE
    images = sparse.csr_matrix((np.ones(len(captions), dtype=np.int64),
                                (np.arange(len(captions)) // CAPTIONS_PER_IMAGE, np.arange(len(captions)))),
                               shape=(n, len(captions)))
    mentions = (images @ per_caption).tocsr()
    mentions.sort_indices()
    return mentions


def region_words(mentions: sparse.csr_matrix, spec: SimSpec, rng: np.random.Generator) -> np.ndarray:
    """(images, num_regions - background_regions) vocabulary ids: each region's word.

    Drawn per image from its content words with probability ~ mentions ** main_power, all images at
    once: a uniform draw ``row + u`` is looked up in the rows' concatenated cumulative distributions.
    """
    n = mentions.shape[0]
    empty = np.flatnonzero(np.diff(mentions.indptr) == 0)
    if len(empty):
        raise DataError(f"simulated data: image {int(empty[0])} has no content word in the vocabulary")
    weight = mentions.data.astype(np.float64) ** spec.main_power
    row = np.repeat(np.arange(n), np.diff(mentions.indptr))
    total = np.bincount(row, weights=weight, minlength=n)
    cum = np.cumsum(weight) - np.repeat(np.cumsum(total) - total, np.diff(mentions.indptr))
    keys = row + cum / total[row]                                    # in (row, row + 1]; increasing
    k = spec.num_regions - spec.background_regions
    draws = np.arange(n)[:, None] + rng.random((n, k))
    pick = np.searchsorted(keys, draws, side="right")
    return mentions.indices[np.minimum(pick, len(keys) - 1)]


def render(words: np.ndarray, protos: np.ndarray, backs: np.ndarray, spec: SimSpec,
           rng: np.random.Generator) -> np.ndarray:
    """(images, num_regions, img_dim) float32 features from each region's word (and backgrounds)."""
    n = words.shape[0]
    content = protos[words]                                                  # (n, k, d)
    background = backs[rng.integers(0, len(backs), size=(n, spec.background_regions))]
    regions = np.concatenate([content, background], axis=1)
    order = np.argsort(rng.random((n, spec.num_regions)), axis=1)           # detectors do not group regions
    regions = np.take_along_axis(regions, order[:, :, None], axis=1)
    style = 0.3 * rng.standard_normal((n, 1, spec.img_dim))
    noise = spec.feature_noise * rng.standard_normal(regions.shape)
    return np.maximum(regions * rng.uniform(0.5, 1.0, size=(n, spec.num_regions, 1)) + style + noise,
                      0.0).astype(np.float32)


def simulate_from_captions(caption_files: Sequence[PathLike], out_dir: PathLike,
                           spec: SimSpec = SimSpec()) -> Dict[str, object]:
    """Write a simulated dataset under ``out_dir`` from the images of ``caption_files`` (5 lines each).

    Returns ``{"data_path", "vocab_path", "data_name", "vocab_size", "img_dim", "num_regions"}``.
    """
    captions: List[str] = []
    for path in caption_files:
        lines = read_captions(path)
        if len(lines) % CAPTIONS_PER_IMAGE:
            raise DataError(f"{path}: {len(lines)} captions, expected {CAPTIONS_PER_IMAGE} per image")
        captions += lines
    n = len(captions) // CAPTIONS_PER_IMAGE
    wanted = sum(spec.images(s) for s in SPLITS)
    if wanted > n:
        raise ConfigError(f"simulated data: {wanted} images asked for, the caption files hold {n}")
    order = _rng(spec, 0).permutation(n)[:wanted]
    bounds = np.cumsum([0] + [spec.images(s) for s in SPLITS])
    split_images = {s: order[bounds[i]:bounds[i + 1]] for i, s in enumerate(SPLITS)}
    split_caps = {s: [captions[CAPTIONS_PER_IMAGE * i + j] for i in ids for j in range(CAPTIONS_PER_IMAGE)]
                  for s, ids in split_images.items()}
    vocab = Vocabulary.build(split_caps["train"] + split_caps["dev"], threshold=spec.vocab_threshold)

    protos = _rng(spec, 1).standard_normal((len(vocab), spec.img_dim))
    backs = _rng(spec, 2).standard_normal((spec.backgrounds, spec.img_dim))
    out_dir = Path(out_dir)
    folder = out_dir / "data" / spec.data_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for i, split in enumerate(SPLITS):
            rng = _rng(spec, 3, i)
            words = region_words(mention_matrix(split_caps[split], vocab), spec, rng)
            feats = render(words, protos, backs, spec, rng)
            atomic_write(folder / f"{split}_ims.npy", lambda fh: np.save(fh, feats))
            atomic_write_text(folder / f"{split}_caps.txt", "\n".join(split_caps[split]) + "\n")
        vocab.to_json(out_dir / "vocab" / f"{spec.data_name}_vocab.json")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write the simulated dataset ({e.strerror or e})") from e
    return {"data_path": str(out_dir / "data"), "vocab_path": str(out_dir / "vocab"), "data_name": spec.data_name,
            "vocab_size": len(vocab), "img_dim": spec.img_dim, "num_regions": spec.num_regions}
