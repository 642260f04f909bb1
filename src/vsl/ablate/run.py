"""``vsl ablate``: a study's arms x seeds trained and tested, then summarised with intervals.

:func:`prepare` resolves everything a study folder depends on (the data — the demo dataset
unless ``data_path`` is given —, the recipe, the arms and seeds) and claims the folder;
:func:`run_study` runs what is left (:mod:`vsl.ablate.runner`) and writes the rows and the summary
(:mod:`vsl.ablate.report`). The same call continues a half-done study.

Recipe: on the demo data the demo's (:data:`vsl.config.DEMO_RECIPE`); on other data the paper's
options; then ``--preset``, then the given ``vsl train`` flags, then each arm's overrides.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..config import DEMO_RECIPE, PRESETS, Config
from ..data.precomp import EVAL_SPLITS
from ..errors import ConfigError, DataError
from ..fileio import atomic_write_text
from ..metrics import PROTOCOLS
from . import report
from .runner import (BEST, MANIFEST, PER_RUN, Executor, Run, Slots, choose_slots, claim_folder, count_lines, dataset_fingerprint,
                     folder_lock, logged_iterations, plan_runs, run_iterations, study_manifest)
from .studies import Study, get_study



@dataclass
class Prepared:
    """A claimed study folder and its runs."""

    study: Study
    out: Path
    runs: List[Run]
    recipe: Dict[str, Any]
    dataset: Dict[str, Any]
    demo_spec: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    manifest: Dict[str, Any] = field(default_factory=dict)

    def finished_checkpoint(self, arm: str, seed: int) -> Optional[Path]:
        """The best checkpoint of run ``arm`` x ``seed`` when it has finished in a folder that holds
        exactly this study (same data, recipe and evaluation: its ``study.json``); None otherwise."""
        try:
            claimed = json.loads((self.out / MANIFEST).read_text(encoding="utf-8")) == self.manifest
        except (OSError, ValueError):
            return None
        run = next((r for r in self.runs if r.arm.name == arm and r.seed == seed), None)
        if not claimed or run is None or run.state() != "finished":
            return None
        return run.checkpoints / BEST


def prepare(study_name: str, seeds: Union[int, Sequence[int]], *, out: Optional[Path] = None, given: Optional[Mapping[str, Any]] = None,
            preset: Optional[str] = None, arms: Sequence[str] = (), difficulty: str = "default", data_seed: int = 0,
            train_images: Optional[int] = None, eval_split: str = "test", protocol: str = "full",
            force: bool = False, recipe: Optional[Mapping[str, Any]] = None, dry_run: bool = False) -> Prepared:
    """Resolve a study and claim its folder (``out``, default ``./vsl-ablate/STUDY``).

    ``seeds``: N (seeds 0 .. N-1) or the seeds themselves.
    ``given``: ``vsl train`` options (Config fields) given on the command line; ``recipe``: the base
    options (default: the demo recipe on the demo data, none otherwise).
    """
    study = get_study(study_name)
    seed_list = _seed_list(seeds)
    selected = study.select(list(arms))
    given = dict(given or {})
    for name in PER_RUN:
        if name in given:
            raise ConfigError(f"--{name} is set by vsl ablate for each run (seeds 0..N-1 via --seeds, folders "
                              "under --out); leave it out")
    if eval_split not in EVAL_SPLITS or protocol not in PROTOCOLS:
        raise ConfigError(f"evaluation split must be one of {EVAL_SPLITS} and protocol one of {PROTOCOLS}, "
                          f"got {eval_split!r}, {protocol!r}")
    out = Path(out) if out is not None else Path("vsl-ablate") / study.name
    demo_spec = None
    if "data_path" not in given:
        from ..data.demo import DEMO_TEST_IMAGES, DemoSpec, make_demo_data

        spec = DemoSpec.at(difficulty, seed=data_seed, test_images=DEMO_TEST_IMAGES, train_images=train_images)
        data = make_demo_data(out / "dataset", spec, progress=not dry_run, thumbnails=False)
        base = dict(DEMO_RECIPE if recipe is None else recipe)
        base.update(data_path=str(data["data_path"]), vocab_path=str(data["vocab_path"]),
                    data_name=str(data["data_name"]), img_dim=int(data["img_dim"]),
                    num_regions=int(data["num_regions"]))
        demo_spec = spec.to_dict()
    else:
        base = dict(recipe or {})
        if difficulty != "default" or train_images is not None:
            raise ConfigError("--difficulty and --demo_images choose the generated demo data; they do not apply "
                              "with --data_path")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        base.update(PRESETS[preset])
    base.update(given)
    base.setdefault("data_name", Config.data_name)
    base.setdefault("vocab_path", Config.vocab_path)
    data_path = Path(base["data_path"])
    _fill_shapes(base, data_path)
    dataset = dataset_fingerprint(data_path, str(base["data_name"]), ("train", "dev", eval_split))
    if dataset["files"].get("train_caps.txt") is None:
        raise DataError(f"{data_path / str(base['data_name']) / 'train_caps.txt'}: not found (expected a dataset "
                        "in the SCAN layout: --data_path DATA holding DATA_NAME/train_caps.txt, ...)")
    recipe_values = {k: v for k, v in base.items() if k not in PER_RUN}
    Config.from_dict(recipe_values, strict=True)            # unknown or invalid options fail here
    runs = plan_runs(study, selected, seed_list, recipe_values, out, eval_split, protocol)
    manifest = study_manifest(study, recipe_values, dataset, eval_split, protocol)
    if not dry_run:
        claim_folder(out, manifest, force=force)
    return Prepared(study, out, runs, recipe_values, dataset, demo_spec,
                    extra={"dataset": dataset, "demo_data": demo_spec, "recipe": manifest["recipe"],
                           "evaluation": manifest["evaluation"]}, manifest=manifest)


def _seed_list(seeds: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(seeds, bool):
        raise ConfigError(f"--seeds must be a positive number of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds must be a positive number of seeds, got {seeds}")
        return list(range(seeds))
    seed_list = [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list) or len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {seeds!r}")
    return seed_list


def _fill_shapes(values: Dict[str, Any], data_path: Path) -> None:
    """``img_dim`` / ``num_regions`` from the training features when not given (the .npy header)."""
    if "img_dim" in values and "num_regions" in values:
        return
    import numpy as np

    path = data_path / str(values["data_name"]) / "train_ims.npy"
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the feature shape ({e}); expected N x regions x dim float32") from None
    if len(shape) != 3:
        raise DataError(f"{path}: features have shape {shape}; expected N x regions x dim")
    values.setdefault("num_regions", int(shape[1]))
    values.setdefault("img_dim", int(shape[2]))


def dry_run_lines(prepared: Prepared, slots: Slots) -> List[str]:
    """The shell lines that would run (one per run: train && eval), for any scheduler."""
    env = " ".join(f"{k}={v}" for k, v in slots.env(0).items() if k != "CUDA_VISIBLE_DEVICES")
    lines = []
    for run in prepared.runs:
        commands = run.commands()
        if commands:
            lines.append(f"{env} " + " && ".join(shlex.join(c) for c in commands))
    return lines


def run_study(prepared: Prepared, *, jobs: Optional[int] = None, progress: bool = True,
              plot: bool = True) -> Dict[str, Any]:
    """Run what is left of a prepared study, then write rows and summary; returns the summary.

    One ``vsl ablate`` at a time per folder (``OUT/.lock`` holds its process id).
    """
    with folder_lock(prepared.out):
        return _run_locked(prepared, jobs, progress, plot)


def _run_locked(prepared: Prepared, jobs: Optional[int], progress: bool, plot: bool) -> Dict[str, Any]:
    from ..logs import progress_bar

    study, out, runs = prepared.study, prepared.out, prepared.runs
    pending = [r for r in runs if r.state() != "finished"]
    device = str(prepared.recipe.get("device", Config.device))
    slots = choose_slots(device, len(pending), jobs)
    done = len(runs) - len(pending)
    start = time.time()
    print(f"vsl ablate --study {study.name}: {len(runs)} runs ({len({r.arm.name for r in runs})} arms "
          f"x {len({r.seed for r in runs})} seeds) in {out}; {done} finished, {len(pending)} to run "
          f"{slots.describe() if pending else ''}", flush=True)
    if pending:
        captions = count_lines(Path(prepared.recipe["data_path"]) / str(prepared.recipe["data_name"])
                               / "train_caps.txt")
        total = {id(r): run_iterations(r.values, captions) for r in pending}
        bar = progress_bar(sum(total.values()), "training", enabled=progress)
        finished: List[str] = []

        def on_done(run: Run) -> None:
            row = report.run_row(study, run)
            what = f"rsum {row['rsum']:.1f}" if row["status"] == "finished" else f"{row['status']}: {row['error']}"
            finished.append(run.arm.name)
            bar.write(f"  {run.label} seed {run.seed}: {what}")
            report.write_rows(out, report.run_rows(study, runs))

        def poll() -> None:
            n = sum(min(total[id(r)], logged_iterations(r.log)) for r in pending)
            bar.update(max(0, n - bar.n))
            bar.set_postfix_str(f"{done + len(finished)}/{len(runs)} runs done", refresh=False)

        executor = Executor(pending, slots, on_done)
        try:
            executor.run(poll)
        finally:
            bar.close()
            write_results(prepared, plot)
    else:
        write_results(prepared, plot)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    print(report.summary_markdown(summary))
    print(f"wrote {out / 'runs.csv'}, runs.json, summary.json, summary.md{', summary.png' if plot else ''} "
          f"({(time.time() - start) / 60:.1f} min)")
    return summary


def write_results(prepared: Prepared, plot: bool = True) -> None:
    """``runs.csv``, ``runs.json``, ``summary.json``, ``summary.md`` and ``summary.png`` from the
    runs finished so far."""
    study, out, runs = prepared.study, prepared.out, prepared.runs
    rows = report.run_rows(study, runs)
    report.write_rows(out, rows)
    summary = report.summarize(study, runs, rows, prepared.extra)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", report.summary_markdown(summary))
    if plot and any(r["status"] == "finished" for r in rows):
        report.plot_summary(summary, rows, out / "summary.png")
