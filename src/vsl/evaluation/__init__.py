"""Evaluation programs: score an encoded split's pairs in image blocks that torchrun can shard
(:mod:`.sharding`, :mod:`.encode`), and ``vsl eval`` itself (:mod:`.run`, :mod:`.command`).

Loading a checkpoint and encoding a split belong to the library (:mod:`vsl.runtime`); their names
are re-exported here for code written before they moved."""
from ..runtime import Embeddings, LoadedModel, encode_split, pad_token_ids
from .encode import score
from .run import evaluate, evaluate_shortlist, load_for_eval, write_json, write_npy
from .sharding import EVAL_IMAGE_BLOCK, image_shard, sharded_similarity

__all__ = [
    "Embeddings", "encode_split", "pad_token_ids", "score", "LoadedModel", "evaluate", "evaluate_shortlist",
    "load_for_eval",
    "write_json", "write_npy", "EVAL_IMAGE_BLOCK", "image_shard", "sharded_similarity",
]
