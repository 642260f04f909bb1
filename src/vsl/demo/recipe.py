"""The demo recipe: the training options of ``vsl demo`` and of ``vsl ablate`` on the demo data.

Everything not set here is the paper's default (:class:`vsl.config.Config`); each departure says
why. Its own module so that ``vsl ablate`` (which ``vsl demo`` uses) can read it without
importing the demo program.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..config import Config

#: Settings of both demo runs; everything else is the paper's default.
DEMO_RECIPE: Dict[str, Any] = dict(
    module_name="SGR",
    # Reduced sizes so that a training step takes a fraction of a second on 2 CPU cores.
    word_dim=64, embed_size=64, sim_dim=32, sgr_step=3,
    batch_size=64,
    # Summing the violations of all negatives (max_violation off) leaves the plateau of constant
    # scores within ~100 iterations; with the hardest negative only, scores saturate and stay there.
    max_violation=False,
    # A higher learning rate than the paper's 3e-4, with a short linear warm-up, then x0.1 for the
    # last epoch. How soon a run leaves the plateau is sensitive to the last bits of the arithmetic
    # (another BLAS, another CPU); at 1e-3 the escape took 100-235+ iterations and the final dev
    # rsum ranged 405-471 between two bit-level variants of one product, at 4e-3 it takes 80-90
    # (one run: 170) and 3 epochs end at dev rsum 548-559 over 3 seeds x 2 variants.
    learning_rate=4e-3, warmup_iters=50, num_epochs=3, lr_update=2,
    # VSL compares soft ranks of scores; while all scores are still equal they carry no order, so
    # VSL joins after the first epoch (in both runs the triplet loss is the same throughout).
    vsl_warmup_epochs=1,
    workers=0, log_step=10, val_step=0,
)

#: Test images of the demo dataset (5 captions each): enough for stable recalls, quick to score.
DEMO_TEST_IMAGES = 500


def demo_config(data: Dict[str, Any], out: Path, name: str, vsl_weight: float, seed: int, epochs: int,
                device: str) -> Config:
    """The configuration of one run with the demo recipe in ``out/runs/name`` (used by ``vsl serve``'s
    demo model); ``data`` is what :func:`vsl.demo.data.make_demo_data` returns."""
    recipe = dict(DEMO_RECIPE, num_epochs=epochs, lr_update=max(1, epochs - 1))
    return Config(data_path=str(data["data_path"]), data_name=str(data["data_name"]),
                  vocab_path=str(data["vocab_path"]), img_dim=int(data["img_dim"]),
                  num_regions=int(data["num_regions"]), vocab_size=int(data["vocab_size"]),
                  model_name=str(out / "runs" / name / "checkpoints"), logger_name=str(out / "runs" / name / "logs"),
                  vsl_weight=vsl_weight, seed=seed, device=device, **recipe)
