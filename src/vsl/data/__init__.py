"""The data side of the library: vocabulary and tokenizer, caption semantics (TF-IDF / CIDEr-D),
and the precomputed-feature datasets of the SCAN layout with their batches and sampler."""
from .precomp import (SPLITS, Batch, Collate, EpochSampler, PrecompDataset, check_finite, check_fits,
                      default_max_captions, make_loader, open_features, split_files)
from .captions import read_captions
from .semantics import CiderSemantics, TfidfSemantics, build_semantics
from .vocab import SPECIAL_TOKENS, UNK_ID, Vocabulary, tokenize, vocab_file

__all__ = [
    "SPLITS", "Batch", "Collate", "EpochSampler", "PrecompDataset", "check_finite", "check_fits",
    "default_max_captions", "make_loader", "open_features", "read_captions", "split_files",
    "CiderSemantics", "TfidfSemantics", "build_semantics",
    "SPECIAL_TOKENS", "UNK_ID", "Vocabulary", "tokenize", "vocab_file",
]
