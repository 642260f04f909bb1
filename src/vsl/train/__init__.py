"""Training programs: the :class:`Trainer` loop of ``vsl train`` (resumable, distributed-aware)."""
from .trainer import DivergenceError, Position, Trainer, learning_rate, rng_state, set_rng_state, train

__all__ = ["DivergenceError", "Position", "Trainer", "learning_rate", "rng_state", "set_rng_state", "train"]
