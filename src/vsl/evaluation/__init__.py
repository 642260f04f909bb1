"""Evaluation programs: encode a split once (:mod:`.encode`), score its pairs in image blocks that
torchrun can shard (:mod:`.sharding`), and ``vsl eval`` itself (:mod:`.run`)."""
from .encode import Embeddings, encode_split, pad_token_ids, score
from .run import LoadedModel, evaluate, load_for_eval, write_json, write_npy
from .sharding import EVAL_IMAGE_BLOCK, image_shard, sharded_similarity

__all__ = [
    "Embeddings", "encode_split", "pad_token_ids", "score", "LoadedModel", "evaluate", "load_for_eval",
    "write_json", "write_npy", "EVAL_IMAGE_BLOCK", "image_shard", "sharded_similarity",
]
