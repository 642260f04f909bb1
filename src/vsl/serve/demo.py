"""The demo index that ``vsl serve`` with no ``--index`` serves, built once and cached.

In the demo working folder (``./vsl-demo`` by default, shared with ``vsl demo``):

1. ``dataset/``: the demo dataset of ``vsl demo`` (the same spec, so the cache is shared), with
   the schematic thumbnails that ``make-demo-data`` draws for every image;
2. ``serve/runs/model/``: SGR+VSL trained with the demo recipe (:data:`vsl.demo.run.DEMO_RECIPE`),
   its best checkpoint copied to ``serve/model.pth.tar`` when training has finished;
3. ``serve/model_shortlist.pth.tar``: that checkpoint with a shortlist head fitted by
   ``vsl fit-shortlist`` (the frozen model, the head trained on the training split);
4. ``serve/index/``: ``vsl index`` of the test split.

Every step is skipped when its output is already there (outputs are written atomically, the
index's manifest last), so a second ``vsl serve`` starts in seconds and an interrupted first one
continues at the step where it stopped (a training run stopped midway starts over; an index build
resumes at its block).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from ..fileio import atomic_write

PathLike = Union[str, os.PathLike]
#: The SGR+VSL run of ``vsl demo`` (its VSL weight); the served model is that run's recipe.
VSL_WEIGHT = 10.0


@dataclass(frozen=True)
class DemoIndex:
    index_dir: Path        # a folder written by build_index
    thumbnails: Path       # {image_id}.png of the indexed split
    checkpoint: Path       # the model with its shortlist head


def build_demo_index(out: PathLike = "./vsl-demo", device: str = "auto", progress: bool = True,
                     seed: int = 0) -> DemoIndex:
    """Build (or reuse) the demo dataset, model, shortlist head and test-split index under ``out``."""
    from ..demo.data import thumbnails_dir
    from ..retrieval import build_index, fit_shortlist

    out = Path(out)
    say = print if progress else (lambda *a, **k: None)
    data, model = demo_model(out, device=device, progress=progress, seed=seed)
    shortlisted = out / "serve" / "model_shortlist.pth.tar"
    if shortlisted.is_file():
        say(f"[3/4] shortlist head: {shortlisted} (cached)", flush=True)
    else:
        say("[3/4] fitting the shortlist head on the frozen model (vsl fit-shortlist)", flush=True)
        fit_shortlist(model, data["data_path"], shortlisted, vocab_path=data["vocab_path"],
                      data_name=data["data_name"], device=device, progress=progress)
    index_dir = out / "serve" / "index"
    say(f"[4/4] index of the test split: {index_dir}", flush=True)
    build_index(shortlisted, data["data_path"], split="test", out=index_dir, data_name=data["data_name"],
                vocab_path=data["vocab_path"], device=device, progress=progress)   # no-op when complete
    return DemoIndex(index_dir=index_dir, thumbnails=thumbnails_dir(out / "dataset", "test"),
                     checkpoint=shortlisted)


def demo_model(out: PathLike = "./vsl-demo", device: str = "auto", progress: bool = True,
               seed: int = 0) -> Tuple[Dict[str, Any], Path]:
    """Steps 1-2: the demo dataset (with thumbnails) and the trained SGR+VSL checkpoint.

    Returns ``(make_demo_data's result, checkpoint path)``.
    """
    from ..demo.data import DemoSpec, make_demo_data
    from ..demo.run import DEMO_RECIPE, DEMO_TEST_IMAGES, demo_config

    out = Path(out)
    work = out / "serve"
    say = print if progress else (lambda *a, **k: None)
    say(f"[1/4] demo dataset: {out / 'dataset'}", flush=True)
    data = make_demo_data(out / "dataset", DemoSpec(test_images=DEMO_TEST_IMAGES), progress=progress)
    model = work / "model.pth.tar"
    if model.is_file():
        say(f"[2/4] demo model: {model} (cached)", flush=True)
        return data, model
    from ..train import Trainer

    say(f"[2/4] training the demo model (SGR+VSL, the recipe of `vsl demo`) in {work / 'runs'}", flush=True)
    cfg = demo_config(data, work, "model", VSL_WEIGHT, seed, DEMO_RECIPE["num_epochs"], device)
    summary = Trainer(cfg, progress=progress).run()
    _copy(Path(summary["best"]), model)
    return data, model


def _copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically."""
    with open(source, "rb") as src:
        atomic_write(target, lambda fh: shutil.copyfileobj(src, fh))
