"""The results of a study: one row per run, the summary with its intervals, its table and figure.

* :func:`run_rows`: ``runs.csv`` / ``runs.json`` rows (arm, seed, status, the error line of a failed
  run, the test metrics of a finished one);
* :func:`summarize`: ``summary.json`` — for each arm the mean and 95% interval over its finished
  seeds of every metric, and for each arm against the baseline the paired bootstrap of
  :mod:`vsl.ablate.stats`;
* :func:`summary_markdown`, :func:`plot_summary`: ``summary.md`` and ``summary.png`` (bars with the
  intervals, one dot per seed, as the paper's ablation figures).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .. import metrics
from ..fileio import atomic_write, atomic_write_text
from . import stats
from ..logs import read_log
from .runner import Run
from .studies import Study

#: Metrics averaged over seeds: the recalls and rsum, then median and mean ranks.
SEED_METRICS = metrics.TABLE_METRICS + metrics.RANK_METRICS
ROW_FIELDS = ("study", "arm", "label", "seed", "status", "error", "seconds", "cpu_seconds", "iterations",
              "best_dev_rsum",
              *SEED_METRICS, "folder")


def run_metrics(result: Mapping) -> Dict[str, float]:
    """Every seed metric of a ``vsl eval`` result."""
    return metrics.flat_metrics(result, SEED_METRICS)


def run_row(study: Study, run: Run) -> Dict[str, Any]:
    """The row of one run: ``status`` finished / failed (with ``error``) / running / interrupted / missing."""
    status = run.status()
    row: Dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update(study=study.name, arm=run.arm.name, label=run.label, seed=run.seed, folder=str(run.folder))
    state = run.state()
    if state == "finished":
        row["status"] = "finished"
        row.update(run_metrics(json.loads(run.test_json.read_text(encoding="utf-8"))))
    else:
        # running (now, or killed without a word), interrupted (resumed next time), failed (tried again)
        row["status"] = status.get("status") if status.get("status") in ("failed", "running", "interrupted") \
            else "missing"
        row["error"] = status.get("error") if row["status"] == "failed" else None
    row["seconds"] = status.get("seconds")
    row["cpu_seconds"] = status.get("cpu_seconds")
    try:
        events = read_log(run.log)
    except OSError:
        events = []
    train = [e for e in events if e.get("split") == "train"]
    val = [e for e in events if e.get("split") == "val"]
    row["iterations"] = train[-1]["step"] if train else None
    row["best_dev_rsum"] = max((e["rsum"] for e in val), default=None)
    return row


def run_rows(study: Study, runs: Sequence[Run]) -> List[Dict[str, Any]]:
    return [run_row(study, r) for r in runs]


def write_rows(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``runs.json`` and ``runs.csv`` (the same rows), atomically."""
    atomic_write_text(out / "runs.json", json.dumps(list(rows), indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in ROW_FIELDS})
    atomic_write_text(out / "runs.csv", buf.getvalue())


def summarize(study: Study, runs: Sequence[Run], rows: Sequence[Mapping[str, Any]],
              extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``summary.json`` of a study (only finished runs count; ``missing`` says how many are not).

    ``{"study", "baseline", "arms": {ARM: {"runs": N, "metrics": {METRIC: {"mean", "ci95"}}}},
    "paired": {ARM: {METRIC: {"diff", "ci95"}}}, "labels", "missing", "seeds", ...}``; ``paired``
    compares every other arm with the baseline over the seeds that both finished.
    """
    arm_names = list(dict.fromkeys(r.arm.name for r in runs))
    by_arm: Dict[str, List[Mapping[str, Any]]] = {a: [] for a in arm_names}
    for row in rows:
        if row["status"] == "finished":
            by_arm[row["arm"]].append(row)
    arms = {}
    for name in arm_names:
        finished = sorted(by_arm[name], key=lambda r: r["seed"])
        arm_metrics = {}
        for m in SEED_METRICS:
            ci = stats.mean_ci([r[m] for r in finished])
            arm_metrics[m] = {"mean": ci["mean"], "ci95": ci["ci95"]}
        arms[name] = {"runs": len(finished), "metrics": arm_metrics}

    contributions: Dict[tuple, Dict[str, np.ndarray]] = {}
    for run in runs:
        if run.state() == "finished":
            with np.load(run.ranks) as z:
                contributions[(run.arm.name, run.seed)] = stats.query_contributions(z["i2t"], z["t2i"])
    paired: Dict[str, Any] = {}
    base = study.baseline
    for name in arm_names:
        if name == base:
            continue
        seeds = sorted({s for a, s in contributions if a == name} & {s for a, s in contributions if a == base})
        if not seeds:
            paired[name] = {m: {"diff": None, "ci95": None} for m in stats.METRICS}
            continue
        result = stats.paired_bootstrap([contributions[(name, s)] for s in seeds],
                                        [contributions[(base, s)] for s in seeds])
        paired[name] = {m: {"diff": v["diff"], "ci95": v["ci95"]} for m, v in result.items()}
    labels = {r.arm.name: r.label for r in runs}
    missing = {a: sum(1 for r in rows if r["arm"] == a and r["status"] != "finished") for a in arm_names}
    cpu = [r["cpu_seconds"] for r in rows if r["status"] == "finished" and r.get("cpu_seconds") is not None]
    summary = {"study": study.name, "baseline": base, "arms": arms, "paired": paired,
               "cpu_seconds": {"finished_runs": len(cpu), "total": float(sum(cpu))},
               "labels": labels, "missing": missing, "missing_total": sum(missing.values()),
               "seeds": sorted({r.seed for r in runs}),
               "paired_seeds": {a: sorted({s for x, s in contributions if x == a} &
                                          {s for x, s in contributions if x == base})
                                for a in arm_names if a != base},
               "method": {"seeds": "mean and Student-t 95% interval over the arm's finished seeds",
                          "paired": "arm - baseline, mean over the seeds both finished; 95% BCa bootstrap "
                                    f"({stats.RESAMPLES} resamples, scipy.stats.bootstrap) over the test images, "
                                    "each with its captions, the same resample for both arms"}}
    if extra:
        summary.update(extra)
    return summary


def _interval(entry: Mapping[str, Any], key: str = "mean") -> str:
    value, ci = entry.get(key), entry.get("ci95")
    if value is None:
        return "-"
    if ci is None:
        return f"{value:.1f}"
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The table of ``summary.md``: mean [95% interval] over seeds, then the paired differences."""
    header = metrics.column_labels()
    lines = [f"## vsl ablate --study {summary['study']}", "",
             "Mean over seeds [95% interval over seeds]:", "",
             "| arm | runs | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for name, arm in summary["arms"].items():
        label = summary["labels"].get(name, name) + (" (baseline)" if name == summary["baseline"] else "")
        missing = summary["missing"].get(name, 0)
        runs = f"{arm['runs']}" + (f" ({missing} missing)" if missing else "")
        lines.append(f"| {label} | {runs} | " + " | ".join(_interval(arm["metrics"][m]) for m in stats.METRICS) + " |")
    if summary["paired"]:
        base = summary["labels"].get(summary["baseline"], summary["baseline"])
        lines += ["", f"Paired difference against {base} (mean over same-seed pairs "
                      "[95% bootstrap interval over test queries]):", "",
                  "| arm | pairs | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
        for name, diff in summary["paired"].items():
            pairs = len(summary["paired_seeds"].get(name, []))
            cells = []
            for m in stats.METRICS:
                d = diff[m]
                cells.append("-" if d["diff"] is None else
                             f"{d['diff']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]")
            lines.append(f"| {summary['labels'].get(name, name)} | {pairs} | " + " | ".join(cells) + " |")
    if summary["missing_total"]:
        lines += ["", f"{summary['missing_total']} run(s) not finished (running, interrupted, failed or not "
                      "started; not counted): see runs.csv."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The paper-style ablation figure: R@K bars per arm with 95% intervals and seed dots, rsum, and
    the paired rsum differences against the baseline with their bootstrap intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    recalls = list(stats.METRICS[:6])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [3, 1.2, 1.4]})
    width = 0.8 / max(1, len(arms))
    x = np.arange(len(recalls))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def bar(ax, pos, entry, color, label=None):
        mean, ci = entry["mean"], entry["ci95"]
        if mean is None:
            return
        err = None if ci is None else np.array([[mean - ci[0]], [ci[1] - mean]])
        ax.bar(pos, mean, width if ax is axes[0] else 0.6, color=color, alpha=0.8, label=label,
               yerr=err, capsize=3, error_kw={"elinewidth": 1})

    for i, name in enumerate(arms):
        color = colors[i % len(colors)]
        label = summary["labels"].get(name, name)
        finished = [r for r in rows if r["arm"] == name and r["status"] == "finished"]
        for j, m in enumerate(recalls):
            bar(axes[0], x[j] + i * width, summary["arms"][name]["metrics"][m], color, label if j == 0 else None)
            axes[0].scatter(np.full(len(finished), x[j] + i * width), [r[m] for r in finished], s=8, color="k",
                            zorder=3)
        bar(axes[1], i, summary["arms"][name]["metrics"]["rsum"], color)
        axes[1].scatter(np.full(len(finished), i), [r["rsum"] for r in finished], s=10, color="k", zorder=3)
    axes[0].set(title="test recall (mean, 95% interval over seeds, dots = seeds)", ylabel="%",
                xticks=x + width * (len(arms) - 1) / 2,
                xticklabels=[m.replace("_r", " R@") for m in recalls], ylim=(0, 100))
    axes[0].legend(fontsize=8, loc="lower right")
    rsums = [r["rsum"] for r in rows if r["status"] == "finished"]
    low = min(rsums) if rsums else 0
    axes[1].set(title="rsum", xticks=range(len(arms)), xticklabels=[summary["labels"].get(a, a) for a in arms],
                ylim=(max(0, low - 40), None))
    axes[1].tick_params(axis="x", labelrotation=20)
    paired = [(a, d["rsum"]) for a, d in summary["paired"].items() if d["rsum"]["diff"] is not None]
    for k, (name, d) in enumerate(paired):
        axes[2].errorbar(d["diff"], k, xerr=[[d["diff"] - d["ci95"][0]], [d["ci95"][1] - d["diff"]]], fmt="o",
                         capsize=4, color=colors[arms.index(name) % len(colors)])
    axes[2].axvline(0, color="gray", lw=1)
    axes[2].set(title=f"rsum - {summary['labels'].get(summary['baseline'], summary['baseline'])} "
                      "(paired, 95% bootstrap)",
                yticks=range(len(paired)), yticklabels=[summary["labels"].get(a, a) for a, _ in paired],
                ylim=(-0.8, max(0.8, len(paired) - 0.2)))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"vsl ablate --study {summary['study']}")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
