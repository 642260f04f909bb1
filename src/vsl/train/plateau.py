"""The plateau of constant scores: its definition, its detection during training, and its exit.

With hardest negatives from the first iteration (the paper's recipe) the batch score matrix can
collapse to one constant: every hinge then costs exactly the margin, so the triplet loss of a batch
of B pairs (summed over both directions) sits at its *collapsed value* ``2 * B * margin``
(``2 * B * (B - 1) * margin`` when it sums over all negatives) and barely moves for thousands of
iterations. B is the size of the batch actually drawn: the epoch's last, short batch has its own.

A log step is *collapsed* when both hold:

* the triplet loss is within :data:`TOLERANCE` (relative) of the collapsed value of its batch;
* the scores have stopped spreading: their standard deviation over the (B, B) matrix is at most
  ``plateau_spread`` x margin (:data:`SPREAD`, 1/400). The hinge of the hardest of B - 1 negatives
  that carry no order exceeds the margin by about 2.5 standard deviations, so this keeps every
  hinge within about 0.6 % of the margin: a statement about the hinge, not about one data set's
  or model's scale of scores.

The loss alone does not decide: summed over all negatives it only measures the mean advantage of
the positives, which stays at the collapsed value while the scores spread out (the first
iterations of ``--fast_start``), and a run that has learned with hardest negatives can sit near
``2 * B * margin`` with spread-out scores (hinges that cancel on average). The spread alone does
not decide either: it is the loss that says the hinge is at the margin.

The plateau is *detected* after ``plateau_log_steps`` consecutive collapsed log steps, which a run
that is learning does not produce. A run has *left* the plateau at the first logged step whose
triplet loss is below :data:`LEFT_FRACTION` of the collapsed value (the measure of
``benchmarks/bench_plateau.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

from ..config import FAST_START

#: Relative distance of the triplet loss from its collapsed value that still counts as collapsed.
TOLERANCE = 0.01
#: Default ``plateau_spread``: scores whose standard deviation is at most this x margin have stopped spreading.
SPREAD = 1 / 400
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
        """The one warning line: the state, and the flags that leave it (``std_threshold``: spread x margin)."""
        return (f"vsl: warning: training is on the plateau of constant scores since iteration {self.since} "
                f"(score std {self.score_std:.2g} <= {std_threshold:.2g}, triplet loss {self.triplet:.4g} = "
                f"collapsed value {self.collapsed:.4g}); leave it with {REMEDY}; "
                f"--stop_on_plateau N stops such a run after N iterations")


class PlateauDetector:
    """Follows the log steps of one run; :meth:`update` returns the :class:`Plateau` while on it.

    Args:
        spread: scores with a standard deviation of at most ``spread * margin`` have stopped spreading.
        log_steps: consecutive collapsed log steps before the plateau is detected (0: never).
        tolerance: relative distance of the triplet loss from the collapsed value.
    """

    def __init__(self, spread: float = SPREAD, log_steps: int = 5, tolerance: float = TOLERANCE):
        self.spread = spread
        self.log_steps = log_steps
        self.tolerance = tolerance
        self.streak = 0
        self.since: Optional[int] = None
        self.reported = False          # the current plateau has been announced

    def std_threshold(self, margin: float) -> float:
        """The standard deviation of the scores at or below which they count as constant."""
        return self.spread * margin

    def collapsed(self, triplet: float, score_std: float, batch_size: int, margin: float, hardest: bool) -> bool:
        """Whether one log step (the loss and scores of a batch of ``batch_size`` pairs) shows the collapsed state."""
        value = collapsed_triplet(batch_size, margin, hardest)
        return score_std <= self.std_threshold(margin) and abs(triplet - value) <= self.tolerance * value

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

    def replay(self, records: Iterable[Dict[str, Any]], margin: float, hardest: bool) -> Optional[Plateau]:
        """The first plateau detected in logged ``train`` records (``step``, ``triplet``, ``score_std``,
        ``batch_size``), e.g. those of a ``metrics.jsonl``; None if there is none."""
        for r in records:
            if r.get("split", "train") != "train":
                continue
            found = self.update(int(r["step"]), float(r["triplet"]), float(r["score_std"]), int(r["batch_size"]),
                                margin, hardest)
            if found is not None:
                return found
        return None
