"""The plateau of constant scores: its definition, its detection during training, and its exit.

With hardest negatives from the first iteration (the paper's recipe) the batch score matrix can
collapse to one constant: every hinge then costs exactly the margin, so the triplet loss (summed
over both directions of a batch of B pairs) sits at ``2 * B * margin`` (``2 * B * (B - 1) * margin``
when it sums over all negatives) and barely moves for thousands of iterations. A run is *on the
plateau* at a log step when the standard deviation of its (B, B) scores is below ``plateau_std``
and its triplet loss is within :data:`TOLERANCE` (relative) of that collapsed value; it is
*detected* after ``plateau_log_steps`` consecutive such log steps, which a run that is learning
does not produce: its scores spread out and its loss falls. A run has *left* the plateau at the
first logged step whose triplet loss is below :data:`LEFT_FRACTION` of the collapsed value (the
measure of ``benchmarks/bench_plateau.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import FAST_START

#: Relative distance of the triplet loss from its collapsed value that still counts as collapsed.
TOLERANCE = 0.01
#: A run has left the plateau when its triplet loss is below this fraction of the collapsed value.
LEFT_FRACTION = 0.9
#: The flags that leave the plateau, named by the warning.
REMEDY = "--fast_start (" + " ".join(f"--{k} {v:g}" for k, v in FAST_START.items()) + ")"


def collapsed_triplet(batch_size: int, margin: float, hardest: bool) -> float:
    """The triplet loss of a (B, B) score matrix whose entries are all equal."""
    return 2.0 * batch_size * margin * (1 if hardest else batch_size - 1)


def left_plateau(triplet: float, batch_size: int, margin: float, hardest: bool) -> bool:
    """Whether a logged triplet loss is below :data:`LEFT_FRACTION` of the collapsed value."""
    return triplet < LEFT_FRACTION * collapsed_triplet(batch_size, margin, hardest)


@dataclass
class Plateau:
    """A detected plateau: ``since`` = the first collapsed log step of the streak, ``step`` = now."""

    since: int
    step: int
    score_std: float
    triplet: float
    collapsed: float

    @property
    def iterations(self) -> int:
        return self.step - self.since

    def warning(self, std_threshold: float) -> str:
        """The one warning line: the state, and the flags that leave it."""
        return (f"vsl: warning: training is on the plateau of constant scores since iteration {self.since} "
                f"(score std {self.score_std:.2g} < {std_threshold:g}, triplet loss {self.triplet:.4g} = "
                f"collapsed value {self.collapsed:.4g}); leave it with {REMEDY}; "
                f"--stop_on_plateau N stops such a run after N iterations")


class PlateauDetector:
    """Follows the log steps of one run; :meth:`update` returns the :class:`Plateau` while on it.

    Args:
        std_threshold: scores with a standard deviation below this count as constant.
        log_steps: consecutive collapsed log steps before the plateau is detected (0: never).
        tolerance: relative distance of the triplet loss from the collapsed value.
    """

    def __init__(self, std_threshold: float, log_steps: int, tolerance: float = TOLERANCE):
        self.std_threshold = std_threshold
        self.log_steps = log_steps
        self.tolerance = tolerance
        self.streak = 0
        self.since: Optional[int] = None
        self.reported = False          # the current plateau has been announced

    def collapsed(self, triplet: float, score_std: float, batch_size: int, margin: float, hardest: bool) -> bool:
        """Whether one log step shows the collapsed state."""
        value = collapsed_triplet(batch_size, margin, hardest)
        return score_std < self.std_threshold and abs(triplet - value) <= self.tolerance * value

    def update(self, step: int, triplet: float, score_std: float, batch_size: int, margin: float,
               hardest: bool) -> Optional[Plateau]:
        """Record the log step ``step``; the plateau if the last ``log_steps`` steps were all collapsed."""
        if self.log_steps <= 0 or not self.collapsed(triplet, score_std, batch_size, margin, hardest):
            self.streak, self.since, self.reported = 0, None, False
            return None
        if self.streak == 0:
            self.since = step
        self.streak += 1
        if self.streak < self.log_steps:
            return None
        return Plateau(since=self.since, step=step, score_std=score_std, triplet=triplet,
                       collapsed=collapsed_triplet(batch_size, margin, hardest))

    def announce(self) -> bool:
        """True once per plateau: whether the caller should warn and log the event now."""
        first, self.reported = not self.reported, True
        return first
