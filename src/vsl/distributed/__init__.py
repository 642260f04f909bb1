"""Running under torchrun: the process group (:mod:`.process`) and the differentiable gathers that
let the loss see the global batch (:mod:`.gather`). Evaluation's image shards live in
:mod:`vsl.evaluation.sharding`."""
from .gather import GlobalBatchScorer, all_gather_with_grad, gather_score_columns, unwrap_model, wrap_model
from .process import (DistInfo, all_gather_concat, all_gather_objects, barrier, cleanup, free_loopback_port,
                      gather_concat, launched_by_torchrun, rank_and_world, setup_distributed)

__all__ = [
    "GlobalBatchScorer", "all_gather_with_grad", "gather_score_columns", "unwrap_model", "wrap_model",
    "DistInfo", "all_gather_concat", "all_gather_objects", "barrier", "gather_concat", "cleanup", "free_loopback_port",
    "launched_by_torchrun", "rank_and_world", "setup_distributed",
]
