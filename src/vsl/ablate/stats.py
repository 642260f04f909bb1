"""The statistics of an ablation study: intervals over seeds and paired bootstraps over queries.

* :func:`mean_ci`: the mean of one metric over the seeds of an arm and its 95% Student-t interval
  (``mean ± t(0.975, n-1) · s / sqrt(n)``; no interval from a single run).
* :func:`query_contributions`: per-query retrieval results as each test image's share of every
  recall metric, from the 0-based ranks that ``vsl eval --save_ranks`` writes. A query unit is
  one test image with its captions (the image as an i2t query, its captions as t2i queries), so
  that i2t and t2i metrics and their sum (rsum) are resampled together.
* :func:`paired_bootstrap`: the difference arm - baseline of every metric, averaged over the seeds
  both arms finished, with a bootstrap interval over the test images (``scipy.stats.bootstrap``;
  the same resampled images for both arms, so the pairing by query and by seed is kept).

Every recall metric is the mean over images of the image's contribution (R@K of i2t: 100 · [rank
< K]; of t2i: 100 · the fraction of its captions with rank < K), so a metric's difference on a
bootstrap sample of images is exactly the mean of the per-image differences on that sample.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import metrics
from ..errors import DataError

#: Metrics of the summary, in table order (named once, in :mod:`vsl.metrics`); ``rsum`` = the sum of
#: the six recalls.
RECALLS = metrics.RECALLS
METRICS = metrics.TABLE_METRICS
flat_metrics = metrics.flat_metrics
CONFIDENCE = 0.95
#: Bootstrap resamples; enough for stable 95% limits (to ~0.1 rsum on 500 images).
RESAMPLES = 9999


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Dict[str, object]:
    """``{"mean", "ci95": [lo, hi] or None, "sd", "n"}`` of one metric over runs (seeds).

    The interval is Student's t: ``mean ± t((1 + confidence) / 2, n - 1) · sd / sqrt(n)`` with the
    sample standard deviation ``sd`` (ddof 1); ``None`` for fewer than two runs.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * sd / np.sqrt(x.size)
    return {"mean": mean, "ci95": [float(mean - half), float(mean + half)], "sd": sd, "n": int(x.size)}


def query_contributions(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> Dict[str, np.ndarray]:
    """Each test image's contribution to every metric: ``{metric: (N,) float64}``.

    Args:
        i2t_ranks: (N,) 0-based rank of each image's best own caption.
        t2i_ranks: (cpi * N,) 0-based rank of each caption's image; captions cpi*i .. cpi*i+cpi-1
            belong to image i.

    The mean over images of a contribution is the metric (in %), e.g. ``contributions["rsum"].mean()``
    is the run's rsum.
    """
    i2t_ranks, t2i_ranks = np.asarray(i2t_ranks), np.asarray(t2i_ranks)
    n = i2t_ranks.shape[0]
    if i2t_ranks.ndim != 1 or n == 0 or t2i_ranks.ndim != 1 or t2i_ranks.shape[0] % n:
        raise DataError(f"per-query ranks have shapes {i2t_ranks.shape} and {t2i_ranks.shape}; expected "
                        "(N,) image ranks and (cpi * N,) caption ranks")
    per_image = {"i2t": i2t_ranks[:, None], "t2i": t2i_ranks.reshape(n, -1)}     # (N, 1), (N, cpi)
    out = {name: 100.0 * (per_image[direction] < k).mean(axis=1) for name, direction, k in RECALLS}
    out["rsum"] = np.sum([out[name] for name, _, _ in RECALLS], axis=0)
    return out


def paired_bootstrap(arm: Sequence[Mapping[str, np.ndarray]], baseline: Sequence[Mapping[str, np.ndarray]],
                     *, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES, seed: int = 0,
                     metrics: Sequence[str] = METRICS) -> Dict[str, Dict[str, object]]:
    """Difference arm - baseline of each metric, paired by seed and by test image.

    Args:
        arm, baseline: per-query contributions (:func:`query_contributions`) of the runs of the
            two arms, in the same seed order (run k of both has the same seed).

    Returns ``{metric: {"diff", "ci95": [lo, hi], "seeds"}}``: ``diff`` is the mean over seeds of
    the metric difference, ``ci95`` a BCa bootstrap interval over the test images (a degenerate
    interval [diff, diff] when every image's difference is the same).
    """
    from scipy import stats

    if len(arm) != len(baseline) or not arm:
        raise ValueError(f"paired runs needed: {len(arm)} vs {len(baseline)}")
    out: Dict[str, Dict[str, object]] = {}
    for k, name in enumerate(metrics):
        # (N,) per-image difference, averaged over the paired seeds.
        d = np.mean([np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)
                     for a, b in zip(arm, baseline)], axis=0)
        diff = float(d.mean())
        # Equal differences on every image (to rounding): no spread to resample (BCa is undefined).
        if d.size < 2 or np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):
            ci = [diff, diff]
        else:
            res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                  method="BCa", vectorized=True, random_state=np.random.default_rng([seed, k]))
            ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
        out[name] = {"diff": diff, "ci95": ci, "seeds": len(arm)}
    return out


def ci_excludes_zero(ci: Optional[Sequence[float]]) -> bool:
    """True when an interval lies entirely above or below 0."""
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
