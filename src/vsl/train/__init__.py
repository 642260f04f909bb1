"""Training programs: the :class:`Trainer` loop of ``vsl train`` (resumable, distributed-aware) and
its command line (:mod:`.command`: the published flags, which ``vsl ablate`` passes through)."""
from .command import add_arguments as add_train_arguments
from .command import given_options, train_config
from .trainer import DivergenceError, Position, Trainer, learning_rate, rng_state, set_rng_state, train

__all__ = ["DivergenceError", "Position", "Trainer", "learning_rate", "rng_state", "set_rng_state", "train",
           "add_train_arguments", "given_options", "train_config"]
