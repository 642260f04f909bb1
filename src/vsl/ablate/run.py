"""``vsl ablate``: a study's arms x seeds trained and tested, then summarised with intervals.

:func:`prepare` resolves everything a study folder depends on (the data — the demo dataset
unless ``data_path`` is given —, the recipe, the arms and seeds) and claims the folder;
:func:`run_study` runs what is left (:mod:`vsl.ablate.runner`) and writes the rows and the summary
(:mod:`vsl.ablate.report`). The same call continues a half-done study.

Recipe: on the demo data the demo's (:data:`vsl.demo.recipe.DEMO_RECIPE`); on other data the paper's
options; then ``--preset``, then the given ``vsl train`` flags, then each arm's overrides.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..config import PRESETS, Config
from ..data.precomp import EVAL_SPLITS
from ..errors import ConfigError, DataError
from ..fileio import atomic_write_text
from ..metrics import PROTOCOLS
from . import report
from .runner import (PER_RUN, Executor, Run, Slots, choose_slots, claim_folder, count_lines, dataset_fingerprint,
                     folder_lock, logged_iterations, plan_runs, run_iterations, study_manifest)
from ..demo.data import DIFFICULTIES
from .studies import STUDIES, Study, get_study



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


def demo_recipe() -> Dict[str, Any]:
    from ..demo.recipe import DEMO_RECIPE

    return dict(DEMO_RECIPE)


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
        from ..demo.data import DemoSpec, make_demo_data
        from ..demo.recipe import DEMO_TEST_IMAGES

        spec = DemoSpec.at(difficulty, seed=data_seed, test_images=DEMO_TEST_IMAGES, train_images=train_images)
        data = make_demo_data(out / "dataset", spec, progress=not dry_run, thumbnails=False)
        base = dict(demo_recipe() if recipe is None else recipe)
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
                           "evaluation": manifest["evaluation"]})


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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
ABLATE_DESCRIPTION = """\
Run one of the paper's ablations with several seeds and report means with 95% intervals:

  vsl ablate --study vsl --seeds 5                          # the demo data, the demo recipe
  vsl ablate --study vsl --seeds 5 --difficulty hard        # the harder demo data
  vsl ablate --study batch-size --seeds 3 --data_path DATA --vocab_path VOCAB --preset coco-sgr

Studies: """ + "; ".join(f"{s.name}: {s.description} (arms {', '.join(a.name for a in s.arms)}; baseline "
                         f"{s.baseline})" for s in STUDIES.values()) + """.

Each arm x seed is one `vsl train` + `vsl eval` run (--dry_run prints them). Running the same
command again skips finished runs, resumes interrupted ones and retries failed ones. Every
`vsl train` flag passes through (except --seed, --model_name, --logger_name, --resume).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vsl ablate`` itself (the cli adds the ``vsl train`` flags)."""
    g = parser.add_argument_group("study")
    g.add_argument("--study", required=True, help=f"one of {', '.join(STUDIES)} (default: none, required)")
    g.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0 .. N-1")
    g.add_argument("--arms", default="", help="comma-separated subset of the study's arms, the baseline always "
                                              "included (default: all)")
    g.add_argument("--out", default=None, help="study folder (default: ./vsl-ablate/STUDY)")
    g.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default: one per CPU core, threads split between them; one per GPU)")
    g.add_argument("--dry_run", action="store_true", help="print the commands that would run, run nothing")
    g.add_argument("--force", action="store_true",
                   help="the folder holds another study or dataset: delete its runs and start over")
    g.add_argument("--no_plot", action="store_true", help="skip summary.png")
    g.add_argument("--summary_only", action="store_true",
                   help="write runs.csv/json and the summary from the runs finished so far, run nothing "
                        "(safe while the study runs)")
    g.add_argument("--eval_split", choices=EVAL_SPLITS, default="test", help="split of the test runs")
    g.add_argument("--protocol", choices=PROTOCOLS, default="full", help="evaluation protocol")
    d = parser.add_argument_group("demo data (when no --data_path is given)")
    d.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="default",
                   help="demo data: hard = look-alike classes and colours, more noise, fewer training images")
    d.add_argument("--data_seed", type=int, default=0, help="seed of the generated demo data")
    d.add_argument("--demo_images", type=int, default=None,
                   help="training images of the demo data (default: the difficulty's)")


def run(args: argparse.Namespace, given: Mapping[str, Any]) -> int:
    """``vsl ablate`` from parsed options; ``given`` are the ``vsl train`` options given."""
    if getattr(args, "resume", None):
        raise ConfigError("--resume is chosen by vsl ablate for each interrupted run; leave it out")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    prepared = prepare(args.study, args.seeds, out=args.out, given=given, preset=args.preset, arms=arms,
                       difficulty=args.difficulty, data_seed=args.data_seed, train_images=args.demo_images,
                       eval_split=args.eval_split, protocol=args.protocol, force=args.force, dry_run=args.dry_run)
    if args.summary_only:
        write_results(prepared, plot=not args.no_plot)
        summary = json.loads((prepared.out / "summary.json").read_text(encoding="utf-8"))
        print(report.summary_markdown(summary))
        return 0
    if args.dry_run:
        pending = sum(1 for r in prepared.runs if r.state() != "finished")
        slots = choose_slots(str(prepared.recipe.get("device", Config.device)), pending, args.jobs)
        lines = dry_run_lines(prepared, slots)
        print(f"# {len(lines)} of {len(prepared.runs)} runs left in {prepared.out} ({slots.describe()} here)")
        print("\n".join(lines))
        return 0
    summary = run_study(prepared, jobs=args.jobs, progress=not getattr(args, "quiet", False),
                        plot=not args.no_plot)
    return 0 if summary["missing_total"] == 0 else 1
