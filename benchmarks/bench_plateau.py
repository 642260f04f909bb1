"""Benchmark: how soon training leaves the plateau of constant scores, paper recipe vs ``--fast_start``.

Two datasets in the SCAN layout, made in a temporary folder:

* ``demo``: the procedural demo data (:mod:`vsl.data.demo`), ``--images`` training images;
* ``cocosim``: region features simulated from the real COCO captions of ``--captions``
  (``dev_caps.txt`` + ``testall_caps.txt``, 6,000 images x 5 captions) by :mod:`vsl.demo.simulate`.

On each, two ``vsl train`` runs with the same seed, model sizes (the demo's: word 64, embed 64,
sim 32, batch 64), epochs and step decay, and the triplet loss alone (``--vsl_weight 0``: the
plateau is the triplet loss's): ``paper`` (hardest negatives from the first iteration, lr 3e-4) and
``fast`` (the same plus :data:`vsl.config.FAST_START`). The baseline is the paper recipe measured in
the same invocation. Reported per run: the first logged iteration at which the run has left the
plateau (triplet loss below 0.9 x its collapsed value, :func:`vsl.train.plateau.left_plateau`;
2*B*margin with hardest negatives, 2*B*(B-1)*margin while the hinge is summed), whether the run
warned of a plateau (a ``plateau`` event in its log: at which iteration, and ``since``), the dev
rsum after each epoch and the wall time. Each run is bounded by ``--run_timeout``.

Usage: python benchmarks/bench_plateau.py [--datasets demo cocosim] [--epochs 3] [--images 1500]
       [--captions ../shared/data/coco_precomp] [--seed 0] [--jobs 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import markdown_table  # noqa: E402

from vsl.config import FAST_START  # noqa: E402
from vsl.train.plateau import left_plateau  # noqa: E402

SIZES = dict(word_dim=64, embed_size=64, sim_dim=32, batch_size=64)
RECIPES: Dict[str, Dict[str, Any]] = {"paper": {}, "fast": dict(FAST_START)}


def make_data(name: str, workdir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    if name == "demo":
        from vsl.data.demo import DemoSpec, make_demo_data
        return make_demo_data(workdir / "demo", DemoSpec(seed=args.data_seed, train_images=args.images,
                                                          dev_images=args.dev_images, test_images=100))
    from vsl.demo.simulate import SimSpec, simulate_from_captions
    files = [Path(args.captions) / "dev_caps.txt", Path(args.captions) / "testall_caps.txt"]
    return simulate_from_captions(files, workdir / "cocosim",
                                  SimSpec(seed=args.data_seed, train_images=args.images,
                                          dev_images=args.dev_images, test_images=100))


def train_flags(data: Dict[str, Any], out: Path, recipe: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    options = dict(SIZES, num_epochs=args.epochs, lr_update=args.lr_update, vsl_weight=0, seed=args.seed,
                   img_dim=data["img_dim"], num_regions=data["num_regions"], workers=0, log_step=10, val_step=0,
                   device="cpu", **recipe)
    flags = ["--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name", data["data_name"],
             "--model_name", str(out / "ckpt"), "--logger_name", str(out / "log"), "--quiet"]
    return flags + [x for k, v in options.items() for x in (f"--{k}", str(v))]


def plateau_exit(events: List[Dict[str, Any]], captions: int, batch: int, margin: float,
                 negatives_warmup: int) -> Optional[int]:
    """First logged iteration with the triplet loss below 0.9 x its collapsed value (None: never)."""
    per_epoch = -(-captions // batch)
    for e in events:
        if e.get("split") != "train":
            continue
        step = e["step"]
        b = e.get("batch_size")         # logged since issue 22; before, inferred: the last batch is smaller
        b = int(b) if b is not None else captions - (per_epoch - 1) * batch if step % per_epoch == 0 else batch
        if left_plateau(e["triplet"], b, margin, hardest=e["epoch"] >= negatives_warmup):
            return step
    return None


def run_one(dataset: str, recipe_name: str, data: Dict[str, Any], workdir: Path,
            args: argparse.Namespace) -> Dict[str, Any]:
    recipe = RECIPES[recipe_name]
    out = workdir / "runs" / f"{dataset}-{recipe_name}"
    cmd = [sys.executable, "-m", "vsl", "train", *train_flags(data, out, recipe, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(args.threads))
    log = out / "log" / "metrics.jsonl"
    done = out / "ckpt" / f"checkpoint_{args.epochs}.pth.tar"
    reused = args.reuse and done.exists() and (out / "run.json").exists()
    if reused:                      # a finished run of this recipe in the kept --workdir
        status, seconds = "ok (reused)", json.loads((out / "run.json").read_text())["seconds"]
    else:
        start = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
        except subprocess.TimeoutExpired:
            status = f"timeout {args.run_timeout}s"
        seconds = round(time.time() - start, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"cmd": cmd, "status": status, "seconds": seconds}))
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    warned = next(({"since": int(e["since"]), "step": int(e["step"])} for e in events if e.get("split") == "plateau"),
                  None)
    captions = sum(1 for _ in open(Path(data["data_path"]) / data["data_name"] / "train_caps.txt"))
    exit_step = plateau_exit(events, captions, SIZES["batch_size"], 0.2, recipe.get("negatives_warmup_epochs", 0))
    val = [e for e in events if e.get("split") == "val"]
    return {"dataset": dataset, "recipe": recipe_name, "status": status, "left_plateau_at": exit_step,
            "iterations": max((e["step"] for e in events if e.get("split") == "train"), default=0),
            "warned": warned, "dev_rsum": [round(e["rsum"], 1) for e in val], "seconds": seconds}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=("demo", "cocosim"), default=["demo", "cocosim"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"of {', '.join(RECIPES)} and --try")
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="NAME:K=V,K=V",
                        help="an extra recipe to compare, e.g. fast4e-3:negatives_warmup_epochs=1,learning_rate=4e-3")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr_update", type=int, default=2, help="x0.1 every N epochs (both recipes)")
    parser.add_argument("--images", type=int, default=1500, help="training images of each dataset")
    parser.add_argument("--dev_images", type=int, default=300)
    parser.add_argument("--captions", default=str(ROOT.parent / "shared" / "data" / "coco_precomp"),
                        help="folder with the real COCO dev_caps.txt and testall_caps.txt")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each by default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run_timeout", type=int, default=1800, help="seconds per training run")
    parser.add_argument("--workdir", default=None, help="keep datasets and runs here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --workdir: take finished runs found there instead of training them again")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    for spec in args.tries:
        name, _, items = spec.partition(":")
        RECIPES[name] = {k: (float(v) if "." in v or "e" in v else int(v))
                         for k, v in (item.split("=") for item in items.split(",") if item)}
        if name not in args.recipes:
            args.recipes.append(name)
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s): {', '.join(unknown)}")

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_plateau_")
    workdir = Path(args.workdir or tmp.name)
    datasets = {name: make_data(name, workdir, args) for name in args.datasets}
    jobs = [(d, r) for d in args.datasets for r in args.recipes]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(job[0], job[1], datasets[job[0]], workdir, args), jobs))
    by_key = {(r["dataset"], r["recipe"]): r for r in rows}
    table = []
    for r in rows:
        base = by_key.get((r["dataset"], "paper"))
        ratio = "-"
        if r["recipe"] != "paper" and base is not None:
            b = base["left_plateau_at"] if base["left_plateau_at"] is not None else base["iterations"]
            prefix = "" if base["left_plateau_at"] is not None else "<"
            ratio = f"{prefix}{r['left_plateau_at'] / b:.2f}" if r["left_plateau_at"] is not None and b else "-"
        left = r["left_plateau_at"] if r["left_plateau_at"] is not None else f"not in {r['iterations']}"
        warned = f"yes (iteration {r['warned']['step']}, since {r['warned']['since']})" if r["warned"] else "no"
        table.append([r["dataset"], r["recipe"], left, ratio, warned,
                      " / ".join(f"{x:.1f}" for x in r["dev_rsum"]) or "-",
                      r["dev_rsum"][-1] if r["dev_rsum"] else "-",
                      "-" if r["seconds"] is None else str(round(r["seconds"])), r["status"]])
    print(f"fast = {' '.join(f'--{k} {v}' for k, v in FAST_START.items())}; both: {args.epochs} epochs, "
          f"x0.1 every {args.lr_update}, seed {args.seed}, {args.images} training images, sizes {SIZES}")
    print(markdown_table(["data", "recipe", "left plateau at iter", "vs paper", "plateau warning",
                          "dev rsum per epoch", "final dev rsum", "seconds", "status"], table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
