"""``vsl demo``: the main job on a fresh machine, in minutes, on the built-in procedural dataset.

1. builds the demo dataset (cached: regenerated only when its spec changes),
2. trains SGR twice with the same recipe and seed: without VSL (the SGR* baseline) and with it
   (on a CPU side by side in two processes),
3. evaluates both on the demo test split (500 images x 2,500 captions),
4. prints the comparison table and writes ``results.json`` and ``demo.png`` (training curves and
   R@K bars).

The recipe differs from the paper's (which stays the default of ``vsl train``) because the paper's
settings sit on a plateau of constant scores for thousands of iterations before the loss starts to
fall; a demo must learn in minutes. See :data:`DEMO_RECIPE` for each departure and its reason.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

from ..config import Config
from ..fileio import atomic_write, atomic_write_text

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

RUNS = (("SGR*", 0.0, "sgr"), ("SGR+VSL", 10.0, "sgr_vsl"))
#: Test images of the demo dataset (5 captions each): enough for stable recalls, quick to score.
DEMO_TEST_IMAGES = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vsl demo``."""
    parser.add_argument("out", nargs="?", default="./vsl-demo",
                        help="working folder: dataset cache, checkpoints, logs, results.json, demo.png")
    parser.add_argument("--seed", type=int, default=0, help="seed of both training runs")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--images", type=int, default=None, help="training images of the demo dataset "
                        "(default: the generator's default, 3,000)")
    parser.add_argument("--epochs", type=int, default=DEMO_RECIPE["num_epochs"], help="training epochs per run")
    parser.add_argument("--vsl_weight", type=float, default=10.0, help="weight of VSL in the VSL run")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--sequential", action="store_true",
                        help="on a CPU, train the two runs one after the other instead of side by side")


def demo_config(data: Dict[str, Any], out: Path, name: str, vsl_weight: float, seed: int, epochs: int,
                device: str) -> Config:
    """The configuration of one demo run."""
    recipe = dict(DEMO_RECIPE, num_epochs=epochs, lr_update=max(1, epochs - 1))
    return Config(data_path=str(data["data_path"]), data_name=str(data["data_name"]),
                  vocab_path=str(data["vocab_path"]), img_dim=int(data["img_dim"]),
                  num_regions=int(data["num_regions"]), vocab_size=int(data["vocab_size"]),
                  model_name=str(out / "runs" / name / "checkpoints"), logger_name=str(out / "runs" / name / "logs"),
                  vsl_weight=vsl_weight, seed=seed, device=device, **recipe)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``vsl demo`` from parsed :func:`add_arguments` options; returns the exit status."""
    from .data import DemoSpec, make_demo_data
    from ..device import resolve_device
    from ..metrics import format_table

    out = Path(args.out)
    start = time.time()
    spec_kw = dict(test_images=DEMO_TEST_IMAGES, **({"train_images": args.images} if args.images else {}))
    spec = DemoSpec(seed=args.data_seed, **spec_kw)
    print(f"[1/3] demo dataset in {out / 'dataset'}", flush=True)
    data = make_demo_data(out / "dataset", spec, progress=True)
    configs = {}
    for label, weight, name in RUNS:
        weight = weight and args.vsl_weight
        shutil.rmtree(out / "runs" / name, ignore_errors=True)     # a fresh run, no stale logs
        configs[label] = demo_config(data, out, name, weight, args.seed, args.epochs, args.device)
    device = resolve_device(args.device)
    cores = os.cpu_count() or 1
    # On a CPU the two small runs are faster side by side, one thread each, than one after the
    # other with all threads (their operations are too small to keep several threads busy).
    parallel = device.type == "cpu" and cores >= 2 and not args.sequential
    print(f"[2/3] training and testing {' and '.join(configs)} "
          f"({'side by side, ' + str(max(1, cores // 2)) + ' thread(s) each' if parallel else 'one after the other'})",
          flush=True)
    runs = _train_and_test(configs, data, parallel, threads=max(1, cores // 2))
    results: Dict[str, Any] = {"recipe": dict(DEMO_RECIPE, num_epochs=args.epochs), "dataset": spec.to_dict(),
                               "runs": runs}
    print(f"[3/3] results on the demo test split ({spec.test_images:,} images, "
          f"{5 * spec.test_images:,} captions)", flush=True)
    print(comparison_table(runs))
    for label, run in runs.items():
        print(f"\n{label}:\n{format_table(run['test'])}")
    results["seconds"] = time.time() - start
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'results.json'}")
    if not args.no_plot:
        plot_demo(runs, out / "demo.png")
        print(f"wrote {out / 'demo.png'}")
    print(f"demo finished in {results['seconds'] / 60:.1f} min")
    return 0


def train_and_test(config_values: Dict[str, Any], data: Dict[str, Any], threads: int = 0,
                   progress: bool = True) -> Dict[str, Any]:
    """Train one demo run and evaluate its best checkpoint on the test split (also in a worker)."""
    import torch

    from ..evaluation import evaluate
    from ..train import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = Config.from_dict(config_values)
    summary = Trainer(cfg, progress=progress).run()
    test = evaluate([summary["best"]], data["data_path"], split="test", protocol="full",
                    vocab_path=data["vocab_path"], device=cfg.device, progress=progress)
    return {"vsl_weight": cfg.vsl_weight, "train": summary, "test": test,
            "log": str(Path(cfg.logger_name) / "metrics.jsonl")}


def _train_and_test(configs: Dict[str, Config], data: Dict[str, Any], parallel: bool,
                    threads: int) -> Dict[str, Dict[str, Any]]:
    if not parallel:
        return {label: train_and_test(cfg.to_dict(), data) for label, cfg in configs.items()}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    # Workers run quietly; one bar here follows both runs through their JSON-lines logs.
    total = {label: _total_iterations(cfg, data) for label, cfg in configs.items()}
    bar = tqdm(total=sum(total.values()), desc="training", unit="it")
    with ProcessPoolExecutor(max_workers=len(configs), mp_context=mp.get_context("spawn")) as pool:
        futures = {label: pool.submit(train_and_test, cfg.to_dict(), data, threads, False)
                   for label, cfg in configs.items()}
        while not all(f.done() for f in futures.values()):
            logged = {label: _logged_iterations(cfg) for label, cfg in configs.items()}   # one read per log
            bar.update(sum(min(total[label], n) for label, n in logged.items()) - bar.n)
            testing = [label for label, n in logged.items() if n >= total[label] and not futures[label].done()]
            bar.set_postfix_str(("testing " + ", ".join(testing)) if testing else "", refresh=False)
            time.sleep(1.0)
        bar.update(bar.total - bar.n)
        bar.close()
        return {label: f.result() for label, f in futures.items()}


def _total_iterations(cfg: Config, data: Dict[str, Any]) -> int:
    captions = Path(data["data_path"]) / str(data["data_name"]) / "train_caps.txt"
    with open(captions, "rb") as fh:
        lines = sum(1 for _ in fh)
    return cfg.num_epochs * -(-lines // cfg.batch_size)


def _logged_iterations(cfg: Config) -> int:
    path = Path(cfg.logger_name) / "metrics.jsonl"
    try:
        steps = [e.get("step", 0) for e in read_log(path) if e.get("split") == "train"]
    except (OSError, ValueError):
        return 0
    return max(steps, default=0)


def comparison_table(runs: Dict[str, Dict[str, Any]]) -> str:
    """The two runs side by side: R@1/5/10 both ways and rsum (markdown)."""
    header = "| run | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        r = run["test"]
        cells = [r["i2t"][k] for k in ("r1", "r5", "r10")] + [r["t2i"][k] for k in ("r1", "r5", "r10")]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {r['rsum']:.1f} |")
    return "\n".join(lines)


def read_log(path: Path) -> List[Dict[str, Any]]:
    """The events of a run's ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_demo(runs: Dict[str, Dict[str, Any]], path: Path) -> Path:
    """Training loss, dev rsum per epoch and test R@K bars of the runs, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    keys = [("i2t", "r1"), ("i2t", "r5"), ("i2t", "r10"), ("t2i", "r1"), ("t2i", "r5"), ("t2i", "r10")]
    width = 0.8 / max(1, len(runs))
    for i, (label, run) in enumerate(runs.items()):
        events = read_log(Path(run["log"]))
        train = [e for e in events if e.get("split") == "train"]
        val = [e for e in events if e.get("split") == "val"]
        axes[0].plot([e["step"] for e in train], [e["triplet"] for e in train], label=f"{label} triplet")
        if any(e.get("vsl") for e in train):
            axes[0].plot([e["step"] for e in train], [e["vsl"] for e in train], "--", label=f"{label} VSL")
        axes[1].plot([e["epoch"] for e in val], [e["rsum"] for e in val], "o-", label=label)
        values = [run["test"][a][k] for a, k in keys]
        axes[2].bar(np.arange(len(keys)) + i * width, values, width, label=f"{label} (rsum {run['test']['rsum']:.1f})")
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss", yscale="log")
    axes[1].set(title="validation rsum (dev)", xlabel="epoch", ylabel="rsum")
    axes[2].set(title="test recall", ylabel="%", xticks=np.arange(len(keys)) + width * (len(runs) - 1) / 2,
                xticklabels=[f"{a} R@{k[1:]}" for a, k in keys], ylim=(0, 100))
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
