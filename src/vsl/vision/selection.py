"""Which proposals become an image's regions: the selection of ``tools/generate_tsv.py`` (bottom-up-attention).

For every object class c >= 1, NMS at IoU 0.3 over the *proposal* boxes (not the class-regressed
ones) under class c's probabilities; a proposal's confidence is the largest probability among the
classes whose NMS kept it (0 if none). The proposals with confidence >= 0.4 are kept, in proposal
order, when there are between ``min_boxes`` and ``max_boxes`` of them; otherwise the ``min_boxes``
(too few) or ``max_boxes`` (too many) most confident, in descending confidence, ties by lower
index. SCAN's files use the fixed layout ``36`` (min = max = 36); ``10:100`` is the adaptive one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..errors import ConfigError
from . import spec
from .ops import nms_per_class


@dataclass(frozen=True)
class BoxSelection:
    """How many regions an image keeps: between ``min_boxes`` and ``max_boxes`` above ``conf_threshold``."""

    min_boxes: int = spec.SELECTION_MIN_BOXES
    max_boxes: int = spec.SELECTION_MAX_BOXES
    conf_threshold: float = spec.SELECTION_CONF_THRESH

    def __post_init__(self) -> None:
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ConfigError(f"--boxes: expected 1 <= min <= max, got {self.min_boxes}:{self.max_boxes}")

    @property
    def fixed(self) -> bool:
        """True for the fixed layout (every image the same number of regions, as SCAN's 36)."""
        return self.min_boxes == self.max_boxes

    @classmethod
    def parse(cls, text: str, conf_threshold: float = spec.SELECTION_CONF_THRESH) -> "BoxSelection":
        """``"36"`` (fixed) or ``"10:100"`` (adaptive min:max) -> a selection."""
        parts = str(text).strip().split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2):
            raise ConfigError(f"--boxes {text!r}: expected N (e.g. 36) or MIN:MAX (e.g. 10:100)")
        return cls(numbers[0], numbers[-1], conf_threshold)

    def __str__(self) -> str:
        return str(self.min_boxes) if self.fixed else f"{self.min_boxes}:{self.max_boxes}"


def max_confidence(proposals: torch.Tensor, class_probs: torch.Tensor,
                   nms_threshold: float = spec.SELECTION_NMS_THRESH) -> torch.Tensor:
    """(R,) each proposal's confidence: its largest class probability among the classes whose NMS keeps it.

    ``proposals`` (R, 4) in input pixels; ``class_probs`` (R, 1 + K), background first (excluded).
    """
    probs = class_probs[:, 1:].float()
    kept = nms_per_class(proposals.float(), probs, nms_threshold)               # (R, K)
    return torch.where(kept, probs, torch.zeros_like(probs)).amax(dim=1).clamp(min=0)


def select_regions(max_conf: torch.Tensor, selection: BoxSelection = BoxSelection()) -> torch.Tensor:
    """The kept proposals' indices (n,) by ``generate_tsv.py``'s rule, from (R,) confidences."""
    confident = torch.nonzero(max_conf >= selection.conf_threshold).squeeze(1)
    count = confident.numel()
    if selection.min_boxes <= count <= selection.max_boxes:
        return confident
    wanted = selection.min_boxes if count < selection.min_boxes else selection.max_boxes
    order = torch.sort(max_conf, descending=True, stable=True).indices
    return order[:wanted]


def select(proposals: torch.Tensor, class_probs: torch.Tensor,
           selection: BoxSelection = BoxSelection()) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keep, max_conf)``: :func:`select_regions` of :func:`max_confidence`."""
    conf = max_confidence(proposals, class_probs)
    return select_regions(conf, selection), conf
