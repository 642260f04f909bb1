"""The ablation studies of ``vsl ablate``: each study's arms, their training options and its baseline.

An arm is a set of ``Config`` overrides applied on top of the study's recipe (the demo recipe on
the demo data, the paper's options plus ``--preset`` and the given ``vsl train`` flags otherwise):

* ``vsl``: the triplet-only baseline (SGR*/SAF*, ``vsl_weight`` 0) against the recipe with VSL —
  the paper's main comparison;
* ``batch-size``: batch 32, 64 and 128 with VSL (the paper's "data diversity" ablation; baseline
  128, the paper's batch);
* ``semantics``: semantic similarity within the visual modality (VSL, the baseline), within both
  modalities (VSL + the textual semantic loss) and VSL with CIDEr-D instead of TF-IDF semantics;
* ``rank``: the soft rank of the published code (``released``, the baseline) against the ranking
  of the paper's figure (``per-image``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Sequence, Tuple

from ..errors import ConfigError


@dataclass(frozen=True)
class Arm:
    """One arm: ``name`` (folder-safe id), ``label`` (``{module}`` = SGR/SAF) and its overrides."""

    name: str
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def title(self, module_name: str) -> str:
        return self.label.format(module=module_name)


@dataclass(frozen=True)
class Study:
    name: str
    baseline: str
    arms: Tuple[Arm, ...]
    description: str

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"study {self.name!r} has no arm {name!r}; its arms: "
                          f"{', '.join(a.name for a in self.arms)}")

    def select(self, names: Sequence[str] = ()) -> Tuple[Arm, ...]:
        """The named arms (all when empty), in the study's order; the baseline is always included."""
        if not names:
            return self.arms
        wanted = {self.arm(n).name for n in names} | {self.baseline}
        return tuple(a for a in self.arms if a.name in wanted)


STUDIES: Dict[str, Study] = {s.name: s for s in (
    Study("vsl", "triplet", (
        Arm("triplet", "{module}*", {"vsl_weight": 0.0}),
        Arm("vsl", "{module}+VSL", {}),                 # the recipe's VSL weight (10 by default)
    ), "VSL against the triplet-only baseline"),
    Study("batch-size", "bs128", (
        Arm("bs32", "batch 32", {"batch_size": 32}),
        Arm("bs64", "batch 64", {"batch_size": 64}),
        Arm("bs128", "batch 128", {"batch_size": 128}),
    ), "batch size with VSL (the paper's data-diversity ablation)"),
    Study("semantics", "visual", (
        Arm("visual", "visual (VSL)", {"textual_semantic_loss": False, "semantic": "tfidf"}),
        Arm("visual-textual", "visual + textual", {"textual_semantic_loss": True, "semantic": "tfidf"}),
        Arm("visual-cider", "visual, CIDEr-D", {"textual_semantic_loss": False, "semantic": "cider"}),
    ), "semantic similarity within the visual and the textual modality"),
    Study("rank", "released", (
        Arm("released", "released rank", {"vsl_rank": "released"}),
        Arm("per-image", "per-image rank", {"vsl_rank": "per-image"}),
    ), "the soft rank of the released code against the paper's per-image ranking"),
)}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return STUDIES[name]


def arm_values(study: Study, arm: Arm, recipe: Mapping[str, Any]) -> Dict[str, Any]:
    """The training options of one arm: the recipe, then the arm's overrides.

    Every study compares VSL with something (its absence or a variant), so the recipe's
    ``vsl_weight`` must be positive.
    """
    if not recipe.get("vsl_weight", 1.0) > 0:
        raise ConfigError(f"study {study.name!r} needs VSL in the recipe; --vsl_weight must be positive, "
                          f"got {recipe.get('vsl_weight')}")
    return {**recipe, **arm.overrides}
