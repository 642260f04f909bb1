"""``vsl ablate``: options and output of :func:`vsl.ablate.prepare` / :func:`vsl.ablate.run_study`."""
from __future__ import annotations

import argparse
import json

from ..config import Config
from ..data.precomp import EVAL_SPLITS
from ..data.demo import DIFFICULTIES
from ..errors import ConfigError
from ..metrics import PROTOCOLS
from ..train import add_train_arguments, given_options
from . import report
from .run import dry_run_lines, prepare, run_study, write_results
from .runner import choose_slots
from .studies import STUDIES

DESCRIPTION = """\
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
    """The options of ``vsl ablate``: its own, then every ``vsl train`` flag (passed through)."""
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
    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``vsl ablate`` from parsed options; the ``vsl train`` options given pass through to every run."""
    given = given_options(args)
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
