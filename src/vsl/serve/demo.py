"""The demo index that ``vsl serve`` with no ``--index`` serves, built once and cached.

In the demo working folder (``./vsl-demo`` by default, shared with ``vsl demo``):

1. ``dataset/``: the demo dataset of ``vsl demo`` (the same spec, so the cache is shared), with
   the schematic thumbnails that ``make-demo-data`` draws for every image;
2. the SGR+VSL model: the finished SGR+VSL run of ``vsl demo`` in the same folder when it is there
   (the same data, recipe and seed: :func:`vsl.demo.demo_vsl_checkpoint`), else ``serve/runs/model/``,
   SGR+VSL trained once with the demo recipe (:data:`vsl.config.DEMO_RECIPE`), its best checkpoint
   copied to ``serve/model.pth.tar`` when training has finished;
3. ``serve/model_shortlist.pth.tar``: that checkpoint with a shortlist head fitted by
   ``vsl fit-shortlist`` (the frozen model, the head trained on the training split; fitted again
   when the model it was fitted on is another one);
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

from ..config import DEMO_RECIPE, Config
from ..fileio import atomic_write

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class DemoIndex:
    index_dir: Path        # a folder written by build_index
    thumbnails: Path       # {image_id}.png of the indexed split
    checkpoint: Path       # the model with its shortlist head


def build_demo_index(out: PathLike = "./vsl-demo", device: str = "auto", progress: bool = True,
                     seed: int = 0) -> DemoIndex:
    """Build (or reuse) the demo dataset, model, shortlist head and test-split index under ``out``."""
    from ..data.demo import thumbnails_dir
    from ..retrieval import build_index, fit_shortlist

    out = Path(out)
    say = print if progress else (lambda *a, **k: None)
    data, model = demo_model(out, device=device, progress=progress, seed=seed)
    shortlisted = out / "serve" / "model_shortlist.pth.tar"
    if shortlisted.is_file() and _fitted_on(shortlisted) == str(model):
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
    from ..data.demo import DEMO_TEST_IMAGES, DemoSpec, make_demo_data
    from ..demo import VSL_WEIGHT, demo_vsl_checkpoint, prepare_demo

    out = Path(out)
    work = out / "serve"
    say = print if progress else (lambda *a, **k: None)
    say(f"[1/4] demo dataset: {out / 'dataset'}", flush=True)
    data = make_demo_data(out / "dataset", DemoSpec(test_images=DEMO_TEST_IMAGES), progress=progress)
    trained = demo_vsl_checkpoint(prepare_demo(out, seed=seed, device=device, dry_run=True), seed)
    if trained is not None:
        say(f"[2/4] demo model: {trained} (the SGR+VSL run of `vsl demo`)", flush=True)
        return data, trained
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


def demo_config(data: Dict[str, Any], out: Path, name: str, vsl_weight: float, seed: int, epochs: int,
                device: str) -> Config:
    """The configuration of one run with the demo recipe in ``out/runs/name``; ``data`` is what
    :func:`vsl.data.demo.make_demo_data` returns."""
    recipe = dict(DEMO_RECIPE, num_epochs=epochs, lr_update=max(1, epochs - 1))
    return Config(data_path=str(data["data_path"]), data_name=str(data["data_name"]),
                  vocab_path=str(data["vocab_path"]), img_dim=int(data["img_dim"]),
                  num_regions=int(data["num_regions"]), vocab_size=int(data["vocab_size"]),
                  model_name=str(out / "runs" / name / "checkpoints"), logger_name=str(out / "runs" / name / "logs"),
                  vsl_weight=vsl_weight, seed=seed, device=device, **recipe)


def _fitted_on(checkpoint: Path) -> str:
    """The checkpoint that ``vsl fit-shortlist`` fitted ``checkpoint``'s head on ("" when unknown)."""
    from ..checkpoint import read_checkpoint

    return str(read_checkpoint(checkpoint)["extra"].get("shortlist_fit", {}).get("source", ""))


def _copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically."""
    with open(source, "rb") as src:
        atomic_write(target, lambda fh: shutil.copyfileobj(src, fh))
