"""Score fusion (issue 21): exhaustive exact scoring vs plain two-stage vs fused two-stage, same run.

For each dataset (``demo``: the procedural demo data of :mod:`vsl.data.demo`; ``cocosim``: region
features simulated from the real COCO captions under ``--captions`` by :mod:`vsl.demo.simulate`)
one SGR+VSL model is trained with the demo recipe (:data:`vsl.config.DEMO_RECIPE`, ``vsl train``).
Its checkpoint after the first epoch is the *weak* model, its best checkpoint after ``--epochs``
the *well-trained* one. Each gets a shortlist head (``vsl fit-shortlist --fit_fusion``: the head,
then lambda on the dev split), and ``vsl eval --shortlist K --compare_exhaustive`` on the test split
gives, from one encoding and one exact scoring of the shortlisted pairs, the three rankings and the
paired bootstrap intervals (fused - exhaustive, fused - plain two-stage) over test images.

The baseline (exhaustive exact scoring) is measured in the same invocation on the same embeddings.

Usage: python benchmarks/bench_fusion.py [--datasets demo cocosim] [--workdir DIR] [--k 100]
       [--epochs 3] [--captions ../shared/data/coco_precomp] [--json OUT]
       python benchmarks/bench_fusion.py --tiny        # seconds: a tiny dataset, 1 epoch (tested)

Run it with ``OMP_NUM_THREADS=1`` on a shared machine; models and heads are cached in ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import markdown_table  # noqa: E402

from vsl.config import DEMO_RECIPE  # noqa: E402

DIRS = ("i2t", "t2i")
RS = ("r1", "r5", "r10")
#: Split sizes of ``--tiny``.
TINY_SIZES = {"train_images": 200, "dev_images": 20, "test_images": 30}
#: The demo's SGR+VSL run (``vsl demo``'s VSL arm).
VSL_WEIGHT = 10.0


def make_data(name: str, workdir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """The dataset ``name`` in ``workdir/name`` (cached by its generator)."""
    if name == "demo":
        from vsl.data.demo import DemoSpec, make_demo_data
        spec = DemoSpec(seed=args.data_seed, **(TINY_SIZES
                                                 if args.tiny else {}))
        return make_demo_data(workdir / "demo", spec, thumbnails=False)
    from vsl.demo.simulate import SimSpec, simulate_from_captions
    files = [Path(args.captions) / "dev_caps.txt", Path(args.captions) / "testall_caps.txt"]
    spec = SimSpec(seed=args.data_seed, **(TINY_SIZES
                                           if args.tiny else {}))
    out = workdir / "cocosim"
    if (out / "done.json").is_file():                # the simulation is deterministic: made once
        return json.loads((out / "done.json").read_text())
    info = simulate_from_captions(files, out, spec)
    (out / "done.json").write_text(json.dumps(info))
    return info


def vsl(*argv: str, log: Optional[Path] = None) -> str:
    """Run ``python -m vsl ARGV`` (this checkout's code); its stdout, or a RuntimeError with its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "vsl", *argv], env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"vsl {argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def train(data: Dict[str, Any], out: Path, args: argparse.Namespace) -> Dict[str, Path]:
    """One demo-recipe SGR+VSL run: ``{"weak": checkpoint after epoch 1, "well": best checkpoint}``."""
    from vsl.ablate.runner import train_flags

    ckpts = out / "ckpt"
    done = {"weak": ckpts / "checkpoint_1.pth.tar", "well": ckpts / "model_best.pth.tar"}
    if not (out / "done").is_file():
        values = dict(DEMO_RECIPE, num_epochs=args.epochs, lr_update=max(1, args.epochs - 1), vsl_weight=VSL_WEIGHT,
                      seed=args.seed, img_dim=data["img_dim"], num_regions=data["num_regions"], device="cpu")
        if args.epochs == 1:
            values["vsl_warmup_epochs"] = 0
        t0 = time.time()
        vsl("train", "--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name",
            data["data_name"], "--model_name", str(ckpts), "--logger_name", str(out / "log"), *train_flags(values),
            "--quiet", log=out / "train.log")
        (out / "done").write_text(json.dumps({"seconds": time.time() - t0}))
    return done


def measure(name: str, data: Dict[str, Any], models: Dict[str, Path], workdir: Path,
            args: argparse.Namespace) -> Dict[str, Any]:
    """Fit head and lambda of each model (cached), then the three rankings of the test split."""
    out = {}
    common = ["--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name", data["data_name"],
              "--quiet", "--device", "cpu"]
    for strength, checkpoint in models.items():
        head = workdir / f"{name}-{strength}-sl.pth.tar"
        if not head.is_file():
            t0 = time.time()
            vsl("fit-shortlist", "--checkpoint", str(checkpoint), "--out", str(head), "--fit_fusion", "--fusion_k",
                str(args.k), *(["--epochs", "2"] if args.tiny else []), *common,
                log=workdir / f"{name}-{strength}-sl.log")
            print(f"{name} {strength}: head and lambda fitted in {time.time() - t0:.0f} s", flush=True)
        result_file = workdir / f"{name}-{strength}-eval-k{args.k}.json"
        if not result_file.is_file():
            vsl("eval", "--checkpoint", str(head), "--split", "test", "--shortlist", str(args.k), "--compare_exhaustive",
                "--output", str(result_file), *common)
        result = json.loads(result_file.read_text())
        from vsl.checkpoint import read_checkpoint

        fit = read_checkpoint(head)["extra"]["shortlist_fusion_fit"]
        out[strength] = {"lambda": result["fusion"]["lambda"], "rankings": result["fusion"]["rankings"],
                         "paired": result["fusion"]["paired"], "images": result["images"],
                         "dev_rsum": fit["rsum"], "shortlist_recall": [result["shortlist"]["recall_i2t"],
                                                                        result["shortlist"]["recall_t2i"]],
                         "test_rsum_exhaustive": result["exhaustive"]["rsum"]}
    return out


RECALL_NAMES = [f"{d}_{r}" for d in DIRS for r in RS]


def targets(strength: str, row: Dict[str, Any]) -> Dict[str, bool]:
    """The issue's numbers to reach, for one model."""
    from vsl.ablate.stats import ci_excludes_zero

    rank = row["rankings"]
    if strength == "weak":
        r1 = all(rank["fused"][f"{d}_r1"] >= max(rank["exhaustive"][f"{d}_r1"], rank["two_stage"][f"{d}_r1"])
                 for d in DIRS)
        ci = all(row["paired"][p]["rsum"]["diff"] > 0 and ci_excludes_zero(row["paired"][p]["rsum"]["ci95"])
                 for p in ("fused-exhaustive", "fused-two_stage"))
        return {"fused R@1 >= exhaustive and two-stage, both directions": r1,
                "rsum interval excludes 0 (vs both)": ci}
    lost = max(rank["exhaustive"][n] - rank["fused"][n] for n in RECALL_NAMES)
    return {f"no recall lost vs exhaustive within 0.5 (largest loss {lost:+.2f})": lost <= 0.5}


def report(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> None:
    header = ["data", "model", "lambda", "ranking", *RECALL_NAMES, "rsum"]
    rows, paired, checks = [], [], []
    for name, models in results.items():
        for strength, row in models.items():
            for ranking in ("exhaustive", "two_stage", "fused"):
                values = row["rankings"][ranking]
                rows.append([name, strength, f"{row['lambda']:.4g}" if ranking == "fused" else "0" if
                             ranking == "two_stage" else "-", ranking.replace("_", "-"),
                             *[f"{values[n]:.2f}" for n in RECALL_NAMES], f"{values['rsum']:.2f}"])
            for pair, diffs in row["paired"].items():
                paired.append([name, strength, pair.replace("_", "-"),
                               *[f"{diffs[n]['diff']:+.2f} [{diffs[n]['ci95'][0]:+.2f}, {diffs[n]['ci95'][1]:+.2f}]"
                                 for n in ("i2t_r1", "t2i_r1", "rsum")]])
            for what, ok in targets(strength, row).items():
                checks.append([name, strength, what, "yes" if ok else "NO"])
    print(f"\ntest split, shortlist K = {args.k} (the same embeddings and exact scores for all three rankings):")
    print(markdown_table(header, rows))
    print("\npaired differences over test images (bootstrap 95% interval, vsl.ablate.stats):")
    print(markdown_table(["data", "model", "difference", "i2t_r1", "t2i_r1", "rsum"], paired))
    print("\nnumbers to reach (issue 21):")
    print(markdown_table(["data", "model", "target", "met"], checks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=("demo", "cocosim"), default=["demo", "cocosim"])
    parser.add_argument("--workdir", default=None, help="cache of data, models and heads (default: a temporary folder)")
    parser.add_argument("--captions", default=str(ROOT.parent / "shared" / "data" / "coco_precomp"),
                        help="folder with dev_caps.txt and testall_caps.txt (cocosim)")
    parser.add_argument("--epochs", type=int, default=DEMO_RECIPE["num_epochs"])
    parser.add_argument("--k", type=int, default=100, help="shortlist size of the two-stage rankings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--stage", choices=("models", "all"), default="all",
                        help="models: only make the data and train (to cache them)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny datasets, 1 training epoch, 2 head epochs, K 10 (a smoke test)")
    parser.add_argument("--json", default=None, help="write all results as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.k = 1, 10
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_fusion_")
        args.workdir = tmp.name
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.datasets:
        data = make_data(name, workdir, args)
        models = train(data, workdir / f"{name}-run", args)
        if args.stage == "models":
            print(f"{name}: data and models ready in {workdir}", flush=True)
            continue
        results[name] = measure(name, data, models, workdir, args)
    if args.stage == "all":
        report(results, args)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
