"""``vsl demo``: the main job on a fresh machine, in minutes, on the built-in procedural dataset.

It is ``vsl ablate --study vsl`` (:mod:`vsl.ablate`) with the demo recipe and one seed by default:

1. builds the demo dataset (cached: regenerated only when its spec changes),
2. trains SGR twice with the same recipe and seed: without VSL (the SGR* baseline) and with it
   (on a CPU side by side in two processes, one thread each), finished runs kept for next time,
3. evaluates both on the demo test split (500 images x 2,500 captions),
4. prints the comparison table and writes ``results.json`` and ``demo.png`` (training curves and
   R@K bars), plus the study's ``summary.*`` (with ``--seeds N``: 95% intervals).

The recipe differs from the paper's (which stays the default of ``vsl train``) because the paper's
settings sit on a plateau of constant scores for thousands of iterations before the loss starts to
fall; a demo must learn in minutes. See :data:`DEMO_RECIPE` for each departure and its reason.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..checkpoint import BEST, LAST
from ..config import DEMO_RECIPE
from ..data.demo import DIFFICULTIES
from ..errors import ConfigError, VSLError
from ..fileio import atomic_write, atomic_write_text
from ..logs import read_log

#: The VSL weight of the demo's SGR+VSL run (the recipe's triplet-only arm sets 0).
VSL_WEIGHT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vsl demo``."""
    parser.add_argument("out", nargs="?", default="./vsl-demo",
                        help="working folder: dataset cache, runs, results.json, demo.png, the study's summary")
    parser.add_argument("--seed", type=int, default=0, help="seed of both training runs")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per run (seed, seed + 1, ...): more than one gives 95%% intervals")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="default",
                        help="demo data: hard = look-alike classes and colours, more noise, fewer training images")
    parser.add_argument("--images", type=int, default=None, help="training images of the demo dataset "
                        "(default: the difficulty's, 3,000 by default)")
    parser.add_argument("--epochs", type=int, default=DEMO_RECIPE["num_epochs"], help="training epochs per run")
    parser.add_argument("--vsl_weight", type=float, default=VSL_WEIGHT, help="weight of VSL in the VSL run")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNGs")
    parser.add_argument("--sequential", action="store_true",
                        help="on a CPU, train the runs one after the other instead of side by side")
    parser.add_argument("--force", action="store_true",
                        help="the folder holds runs of other options: delete them and start over")


def prepare_demo(out, *, seed: int = 0, seeds: int = 1, epochs: int = DEMO_RECIPE["num_epochs"],
                 vsl_weight: float = VSL_WEIGHT, device: str = "auto", difficulty: str = "default",
                 data_seed: int = 0, images=None, force: bool = False, dry_run: bool = False):
    """The study of ``vsl demo`` in ``out``: ``vsl ablate --study vsl`` with the demo recipe
    (:func:`vsl.ablate.prepare`; ``dry_run`` claims nothing)."""
    from ..ablate import prepare

    if seeds < 1:
        raise ConfigError(f"--seeds must be positive, got {seeds}")
    given = {"num_epochs": epochs, "lr_update": max(1, epochs - 1), "vsl_weight": vsl_weight, "device": device}
    return prepare("vsl", list(range(seed, seed + seeds)), out=Path(out), given=given, difficulty=difficulty,
                   data_seed=data_seed, train_images=images, force=force, dry_run=dry_run)


def demo_vsl_checkpoint(prepared, seed: int = 0) -> Optional[Path]:
    """The best checkpoint of the demo's finished SGR+VSL run of ``seed`` (None when there is none)."""
    return prepared.finished_checkpoint("vsl", seed)


def run(args: argparse.Namespace) -> int:
    """Run ``vsl demo`` from parsed :func:`add_arguments` options; returns the exit status.

    The demo is ``vsl ablate --study vsl`` with the demo recipe, in ``OUT`` (finished runs are
    kept: running it again only redoes what is missing), plus the demo's own outputs.
    """
    from ..ablate import run_study
    from ..metrics import format_table

    out = Path(args.out)
    start = time.time()
    print(f"[1/3] demo dataset in {out / 'dataset'}", flush=True)
    prepared = prepare_demo(out, seed=args.seed, seeds=args.seeds, epochs=args.epochs, vsl_weight=args.vsl_weight,
                            device=args.device, difficulty=args.difficulty, data_seed=args.data_seed,
                            images=args.images, force=args.force)
    print("[2/3] training and testing SGR* and SGR+VSL", flush=True)
    summary = run_study(prepared, jobs=1 if args.sequential else None, plot=not args.no_plot)
    failed = [r for r in json.loads((out / "runs.json").read_text(encoding="utf-8")) if r["status"] == "failed"]
    if failed:
        raise VSLError(f"{failed[0]['label']} seed {failed[0]['seed']} failed ({failed[0]['folder']}): "
                       f"{failed[0]['error']}")
    runs = demo_runs(prepared)
    spec = prepared.demo_spec
    print(f"[3/3] results on the demo test split ({spec['test_images']:,} images, "
          f"{5 * spec['test_images']:,} captions), seed {args.seed}", flush=True)
    print(comparison_table(runs))
    for label, run in runs.items():
        print(f"\n{label}:\n{format_table(run['test'])}")
    results: Dict[str, Any] = {"recipe": dict(DEMO_RECIPE, num_epochs=args.epochs), "dataset": spec,
                               "runs": runs, "summary": summary, "seconds": time.time() - start}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'results.json'}")
    if not args.no_plot and runs:
        plot_demo(runs, out / "demo.png")
        print(f"wrote {out / 'demo.png'}")
    print(f"demo finished in {results['seconds'] / 60:.1f} min")
    served = demo_vsl_checkpoint(prepare_demo(out, device=args.device, dry_run=True))
    if served is not None:
        print(f"search with this SGR+VSL model in a browser: vsl serve --demo_dir {out} (its shortlist head "
              "and index are built once)")
    else:
        print(f"vsl serve --demo_dir {out} serves an SGR+VSL model of the default demo options (this run's "
              "options differ, so it trains that model once)")
    return 0


def demo_runs(prepared) -> Dict[str, Dict[str, Any]]:
    """The finished runs of the demo's first seed: ``{label: {vsl_weight, train, test, log}}``."""
    first = min(r.seed for r in prepared.runs)
    runs: Dict[str, Dict[str, Any]] = {}
    for run in prepared.runs:
        if run.seed != first or run.state() != "finished":
            continue
        events = read_log(run.log)
        train = [e for e in events if e.get("split") == "train"]
        val = [e for e in events if e.get("split") == "val"]
        runs[run.label] = {
            "vsl_weight": float(run.values.get("vsl_weight", VSL_WEIGHT)),
            "train": {"epoch": max((e["epoch"] for e in val), default=0),
                      "iteration": train[-1]["step"] if train else 0,
                      "best_rsum": max((e["rsum"] for e in val), default=None),
                      "last": str(run.checkpoints / LAST),
                      "best": str(run.checkpoints / BEST),
                      "seconds": run.status().get("train_seconds")},
            "test": json.loads(run.test_json.read_text(encoding="utf-8")),
            "log": str(run.log)}
    return runs


def comparison_table(runs: Dict[str, Dict[str, Any]]) -> str:
    """The two runs side by side: R@1/5/10 both ways and rsum (markdown)."""
    from ..metrics import TABLE_METRICS, column_labels, flat_metrics

    lines = ["| run | " + " | ".join(column_labels()) + " |", "|---|" + "---|" * len(TABLE_METRICS)]
    for label, run in runs.items():
        cells = flat_metrics(run["test"]).values()
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def plot_demo(runs: Dict[str, Dict[str, Any]], path: Path) -> Path:
    """Training loss, dev rsum per epoch and test R@K bars of the runs, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    from ..metrics import RECALLS, flat_metrics

    keys = [name for name, _, _ in RECALLS]
    width = 0.8 / max(1, len(runs))
    for i, (label, run) in enumerate(runs.items()):
        events = read_log(Path(run["log"]))
        train = [e for e in events if e.get("split") == "train"]
        val = [e for e in events if e.get("split") == "val"]
        axes[0].plot([e["step"] for e in train], [e["triplet"] for e in train], label=f"{label} triplet")
        if any(e.get("vsl") for e in train):
            axes[0].plot([e["step"] for e in train], [e["vsl"] for e in train], "--", label=f"{label} VSL")
        axes[1].plot([e["epoch"] for e in val], [e["rsum"] for e in val], "o-", label=label)
        values = list(flat_metrics(run["test"], keys).values())
        axes[2].bar(np.arange(len(keys)) + i * width, values, width, label=f"{label} (rsum {run['test']['rsum']:.1f})")
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss", yscale="log")
    axes[1].set(title="validation rsum (dev)", xlabel="epoch", ylabel="rsum")
    axes[2].set(title="test recall", ylabel="%", xticks=np.arange(len(keys)) + width * (len(runs) - 1) / 2,
                xticklabels=[f"{d} R@{k}" for _, d, k in RECALLS], ylim=(0, 100))
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.legend(fontsize=8, loc="lower left" if ax is axes[2] else "best")
        ax.grid(alpha=0.3)
    fig.suptitle("vsl demo: SGR with and without the Visual Semantic Loss")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
