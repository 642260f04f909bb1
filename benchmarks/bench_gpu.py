#!/usr/bin/env python
"""GPU benchmark of all-pairs scoring and training steps (issue 7), one run, one table.

Sections, each guarded by the time budget (``--time-budget``; a section that runs out stops, and its
rate is extrapolated from the pairs it finished, marked "partial" in the table):

1. **matrix-product rate** of the device: a square ``--matmul-size`` product in exact float32 (TF32
   off), in TF32 and in bfloat16.
2. **per-caption loop** (the published evaluation): ``vsl.models.reference.published_similarity`` over image and
   caption shards of ``--loop-shard`` (published ``shard_size`` = 100) on a ``--loop-images`` x
   ``--loop-captions`` block, float32. The loop may stop before the block is done (at
   ``--loop-seconds``); its pairs/s then comes from the shards it finished. The batched scorer is
   timed on the same block and the largest score difference on the finished shards is reported.
3. **COCO-5K-sized scoring**, end to end: random region features ``(images, 36, 2048)`` and word
   ids with COCO-like lengths (:func:`common.coco_like_lengths`) are encoded by the model at published
   sizes, all ``images x captions`` pairs are scored in chunks, and the float32 score matrix is copied
   to the host; for SGR and SAF, in each ``--precisions`` mode. Reduced modes report the max
   absolute score difference against fp32 (same weights, same inputs).
4. **training step** at ``--batch-size`` (published 128) and published sizes, VSL on: encode,
   score the batch, :class:`vsl.losses.VSLObjective` (triplet + VSL, on float32 scores), backward,
   gradient clipping, Adam step; with the batched scorer in each ``--train-precisions`` mode, and
   with the per-caption loop as the scorer (fp32).

Before the COCO-5K scoring, on CUDA, one scoring call forced into many chunks runs under
``torch.cuda.set_sync_debug_mode("warn")`` and the host synchronisations are counted: a fixed small
number, not one per chunk, shows the scoring loop never waits for the device.

"% of matmul rate" = pairs/s x :func:`common.flops_per_pair` (the published loop's arithmetic) divided by
the device's matrix-product rate in the same mode (fp32 rows against the exact fp32 rate, tf32
against TF32, bf16 against bf16). For SGR the batched scorer does about 40 % fewer FLOP per pair
than the published loop (folded query/key, last reasoning step on node 0 only), so this is the
fraction of the device's rate at which the published algorithm's work gets done.

Weights are random (published initialisation), so the scores are not meaningful, only their cost
and their sensitivity to precision. ``torch.cuda.synchronize`` is called only around timed regions.

Usage::

    python benchmarks/bench_gpu.py                           # CUDA, full sizes, about 7 minutes
    python benchmarks/bench_gpu.py --quick                   # CUDA, tiny sizes: a sanity check first
    python benchmarks/bench_gpu.py --device cpu --quick      # tiny sizes, smoke test (< 1 minute)

The table is printed as markdown and written, with the device name, torch version and date, to
``--json`` (default ``$OUT/bench_gpu.json`` when ``$OUT`` is set).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tqdm import tqdm

from vsl.models.reference import published_similarity
from vsl.config import PRECISIONS, Config
from vsl.losses import VSLObjective
from vsl.models import VSLModel, build_model
from vsl.precision import precision_context
from vsl.fileio import atomic_write_text
from vsl.models.similarity import default_chunk_elements

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import coco_like_lengths, flops_per_pair, matmul_rate, sync  # noqa: E402

#: Full-size (published) and smoke-test settings; command-line values override either.
FULL = dict(images=5000, captions=25000, loop_images=1000, loop_captions=1000, loop_shard=100,
            loop_seconds=20.0, batch_size=128, train_steps=5, matmul_size=8192, time_budget=390.0)
QUICK = dict(images=24, captions=120, loop_images=20, loop_captions=20, loop_shard=10,
             loop_seconds=3.0, batch_size=12, train_steps=2, matmul_size=256, time_budget=40.0)
#: Tiny model for ``--quick`` (published sizes otherwise).
QUICK_MODEL = dict(img_dim=64, word_dim=32, embed_size=64, sim_dim=32, vocab_size=500, num_regions=12)

#: Relative share of the remaining time budget that each section may use.
SECTION_WEIGHTS = {"loop": 1.0, "score_fp32": 3.5, "score": 1.25, "train": 0.5}


class OutOfTime(Exception):
    """Raised from a progress callback when a section's time is up."""


# ------------------------------------------------------------------------------------------------
# Problem sizes
# ------------------------------------------------------------------------------------------------
def model_config(module_name: str, quick: bool) -> Config:
    """Published sizes (or the tiny quick sizes) with VSL on, as the paper trains."""
    return Config(module_name=module_name, vsl_weight=10.0, **(QUICK_MODEL if quick else {}))


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------
def free_device_memory(device: torch.device) -> None:
    gc.collect()                                  # drop reference cycles that still hold device tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """Wall-clock budget of the whole run, shared out among the sections still to come."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self, weight: float, weights_left: float, cap: Optional[float] = None) -> float:
        """Absolute deadline of a section of ``weight``, when ``weights_left`` (itself included) remain."""
        share = max(0.0, self.remaining()) * weight / max(weight, weights_left)
        if cap is not None:
            share = min(share, cap)
        return time.perf_counter() + share


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def random_inputs(config: Config, n_images: int, n_captions: int, device: torch.device, seed: int):
    """Region features ``(n, R, img_dim)``, word ids ``(m, L)``, lengths ``(m,)`` (CPU) like COCO's."""
    lengths = coco_like_lengths(n_captions, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Bottom-up-attention features are post-ReLU, hence non-negative.
    images = torch.randn(n_images, config.num_regions, config.img_dim, device=device, generator=gen).relu_()
    max_len = int(lengths.max())
    captions = torch.randint(4, config.vocab_size, (n_captions, max_len), device=device, generator=gen)
    positions = torch.arange(max_len, device=device)
    lengths_dev = lengths.to(device)
    captions[:, 0] = 1                                                           # <start>
    captions.scatter_(1, (lengths_dev - 1).unsqueeze(1), 2)                      # <end>
    captions.masked_fill_(positions >= lengths_dev.unsqueeze(1), 0)              # padding
    return images, captions, lengths


def random_semantic(batch: int, device: torch.device, seed: int) -> torch.Tensor:
    """A symmetric ``(B, B)`` image-image similarity with unit diagonal (cosines of random vectors)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.rand(batch, 64, device=device, generator=gen), dim=1)
    return feats @ feats.t()


def build(config: Config, device: torch.device, seed: int) -> VSLModel:
    torch.manual_seed(seed)
    return build_model(config).to(device)


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def score_end_to_end(model: VSLModel, images, captions, lengths, precision: str, deadline: float,
                     chunk_elements: Optional[int], device: torch.device, label: str) -> dict:
    """Encode, score all pairs and copy the float32 scores to the host; stop at ``deadline``.

    Returns ``pairs`` scored, ``seconds``, ``complete`` and (if complete) the host ``scores``.
    """
    n, m = images.size(0), captions.size(0)
    done = [0]
    bar = tqdm(total=n * m, desc=label, unit="pair", unit_scale=True, mininterval=10, leave=False,
               file=sys.stderr, disable=None)

    def progress(pairs: int) -> None:
        done[0] += pairs
        bar.update(pairs)
        if time.perf_counter() > deadline:
            raise OutOfTime

    model.eval()
    # Warm-up on a small problem: kernel selection, cuBLAS/cuDNN handles, autocast weight casts.
    with torch.inference_mode(), precision_context(precision, device):
        k = min(m, 64)
        model.similarity(model.encode_images(images[:8]), model.encode_captions(captions[:k], lengths[:k]),
                         lengths[:k])
    sync(device)
    scores = None
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), precision_context(precision, device):
            img_emb = model.encode_images(images)
            cap_emb = model.encode_captions(captions, lengths)
            sims = model.similarity(img_emb, cap_emb, lengths, chunk_elements=chunk_elements, progress=progress)
            scores = sims.float().cpu()
    except OutOfTime:
        pass
    finally:
        bar.close()
    sync(device)
    seconds = time.perf_counter() - t0
    return dict(pairs=done[0], total_pairs=n * m, seconds=seconds, complete=scores is not None, scores=scores)


def count_host_syncs(model: VSLModel, images, captions, lengths, device: torch.device) -> dict:
    """Host synchronisations of one scoring call forced into many chunks (CUDA only).

    Uses ``torch.cuda.set_sync_debug_mode("warn")``: every operation that waits for the device warns.
    A scorer without syncs inside its loop shows a small count independent of the chunk count.
    """
    n, m = min(images.size(0), 128), min(captions.size(0), 1024)
    chunks = [0]
    model.eval()
    with torch.inference_mode():
        img_emb = model.encode_images(images[:n])
        cap_emb = model.encode_captions(captions[:m], lengths[:m])
        lengths_dev = lengths[:m].to(device)
        budget = n * (int(lengths[:m].max()) + 1) * model.config.embed_size * 8   # about 8 captions a chunk
        sync(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.similarity(img_emb, cap_emb, lengths_dev, chunk_elements=budget,
                                 progress=lambda p: chunks.__setitem__(0, chunks[0] + 1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return dict(syncs=syncs, chunks=chunks[0])


def loop_baseline(model: VSLModel, images, captions, lengths, shard: int, deadline: float,
                  device: torch.device) -> dict:
    """The published evaluation loop on a block, fp32: shards of ``shard`` images x ``shard`` captions,
    one caption at a time inside a shard; then the batched scorer on the same block.
    """
    model.eval()
    n, m = images.size(0), captions.size(0)
    with torch.inference_mode(), precision_context("fp32", device):
        img_emb = model.encode_images(images)
        cap_emb = model.encode_captions(captions, lengths)
        published_similarity(model.sim_enc, img_emb[:shard], cap_emb[:2], lengths[:2])    # warm-up
        sync(device)
        loop_blocks: List[Tuple[int, int, torch.Tensor]] = []
        t0 = time.perf_counter()
        stop = False
        for i0 in range(0, n, shard):
            for j0 in range(0, m, shard):
                # lengths stay on the host, as the published code's Python list of lengths.
                out = published_similarity(model.sim_enc, img_emb[i0:i0 + shard], cap_emb[j0:j0 + shard],
                                                        lengths[j0:j0 + shard])
                loop_blocks.append((i0, j0, out))
                if time.perf_counter() > deadline:
                    stop = True
                    break
            if stop:
                break
        sync(device)
        loop_seconds = time.perf_counter() - t0
        loop_pairs = sum(b[2].numel() for b in loop_blocks)

        lengths_dev = lengths.to(device)
        model.similarity(img_emb[:8], cap_emb[:8], lengths_dev[:8])                       # warm-up
        sync(device)
        t0 = time.perf_counter()
        batched = model.similarity(img_emb, cap_emb, lengths_dev)
        sync(device)
        batched_seconds = time.perf_counter() - t0
        max_diff = max(float((batched[i0:i0 + b.size(0), j0:j0 + b.size(1)] - b).abs().max())
                       for i0, j0, b in loop_blocks)
    return dict(loop_pairs=loop_pairs, loop_seconds=loop_seconds, total_pairs=n * m,
                complete=loop_pairs == n * m, batched_seconds=batched_seconds, max_diff=max_diff)


def train_step_rate(config: Config, device: torch.device, precision: str, per_caption: bool,
                    batch: int, steps: int, deadline: float, seed: int) -> dict:
    """Seconds per training step: encode, score, triplet + VSL, backward, clip, Adam step."""
    model = build(config, device, seed).train()
    objective = VSLObjective(config.margin, config.max_violation, config.vsl_weight, config.vsl_temperature,
                             config.vsl_rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    images, captions, lengths = random_inputs(config, batch, batch, device, seed)
    lengths_dev = lengths.to(device)
    semantic = random_semantic(batch, device, seed)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision_context(precision, device):
            img_emb = model.encode_images(images)
            cap_emb = model.encode_captions(captions, lengths)
            if per_caption:
                scores = published_similarity(model.sim_enc, img_emb, cap_emb, lengths)
            else:
                scores = model.similarity(img_emb, cap_emb, lengths_dev)
        # The losses compare scores at temperature 0.001: always in float32.
        loss = objective(scores.float(), semantic)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    step()                                                    # warm-up: allocator, kernels, Adam state
    sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        step()
        done += 1
        if time.perf_counter() > deadline:
            break
    sync(device)
    seconds = time.perf_counter() - t0
    return dict(steps=done, seconds=seconds, step_seconds=seconds / max(done, 1))


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
COLUMNS = ("measurement", "model", "precision", "pairs", "time (s)", "pairs/s", "% of matmul rate",
           "max abs diff vs fp32", "note")


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _duration(seconds: float) -> str:
    if not seconds == seconds:                                # NaN
        return "-"
    if seconds < 120:
        return f"{_num(seconds)} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Report:
    """Rows of the table plus run metadata; printed as markdown, saved as JSON after every section."""

    def __init__(self, meta: dict, json_path: Optional[Path]):
        self.meta = meta
        self.rows: List[dict] = []
        self.summary: Dict[str, object] = {}
        self.json_path = json_path

    def add(self, **row) -> None:
        self.rows.append(row)
        print(self._markdown_row(row), flush=True)
        self.save()

    @staticmethod
    def _markdown_row(row: dict) -> str:
        cells = [row.get("measurement", ""), row.get("model", ""), row.get("precision", ""),
                 _num(row.get("pairs"), 4), _num(row.get("seconds")), _num(row.get("pairs_per_s")),
                 _num(None if row.get("fraction") is None else 100 * row["fraction"]),
                 _num(row.get("max_diff")), row.get("note", "")]
        return "| " + " | ".join(str(c) for c in cells) + " |"

    @staticmethod
    def header() -> str:
        return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)

    def markdown(self) -> str:
        m = self.meta
        lines = [f"GPU benchmark: {m['device_name']} ({m['device']}), torch {m['torch']}, {m['date']}",
                 ""]
        rates = m.get("matmul_tflops", {})
        if rates:
            lines.append("Matrix-product rate (TFLOP/s): "
                         + ", ".join(f"{k} {_num(v)}" for k, v in rates.items()))
        lines.append(f"Problem: {m['images']} images x {m['captions']} captions, mean caption length "
                     f"{m['mean_len']:.2f} words; published FLOP/pair: "
                     + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in m.get("flops_per_pair", {}).items()))
        lines += ["", self.header()] + [self._markdown_row(r) for r in self.rows] + [""]
        lines += [f"- {k}: {v}" for k, v in self.summary.items()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dict(meta=self.meta, rows=self.rows, summary=self.summary)

    def save(self) -> None:
        """Write the JSON report atomically (readers never see half a file)."""
        if self.json_path is not None:
            atomic_write_text(self.json_path, json.dumps(self.to_json(), indent=1))


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--images", type=int, help=f"images to score (default {FULL['images']})")
    p.add_argument("--captions", type=int, help=f"captions to score (default {FULL['captions']})")
    p.add_argument("--loop-images", type=int, help=f"per-caption loop block (default {FULL['loop_images']})")
    p.add_argument("--loop-captions", type=int, help=f"per-caption loop block (default {FULL['loop_captions']})")
    p.add_argument("--loop-shard", type=int, help=f"published shard size (default {FULL['loop_shard']})")
    p.add_argument("--loop-seconds", type=float,
                   help=f"longest time per loop run; its rate is extrapolated (default {FULL['loop_seconds']})")
    p.add_argument("--batch-size", type=int, help=f"training batch (default {FULL['batch_size']})")
    p.add_argument("--train-steps", type=int, help=f"timed training steps (default {FULL['train_steps']})")
    p.add_argument("--matmul-size", type=int, help=f"square matmul size (default {FULL['matmul_size']})")
    p.add_argument("--time-budget", type=float, help=f"seconds for the whole run (default {FULL['time_budget']})")
    p.add_argument("--modules", default="SGR,SAF", help="comma-separated: SGR,SAF")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated modes to score in")
    p.add_argument("--train-precisions", default=",".join(PRECISIONS),
                   help="comma-separated modes of the batched training step (the loop runs in fp32)")
    p.add_argument("--chunk-elements", type=int, default=None, help="scoring chunk budget (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    default_json = os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None
    p.add_argument("--json", default=default_json, help="where to write the results as JSON")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modules = [s.strip() for s in args.modules.split(",") if s.strip()]
    for module in args.modules:
        if module not in ("SGR", "SAF"):
            p.error(f"--modules: unknown module {module!r}")
    for name in ("precisions", "train_precisions"):
        modes = [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        for precision in modes:
            if precision not in PRECISIONS:
                p.error(f"--{name.replace('_', '-')}: unknown mode {precision!r} "
                        f"(choose from {', '.join(PRECISIONS)})")
        # fp32 is the reference of every comparison and runs first.
        setattr(args, name, ["fp32"] + [x for x in dict.fromkeys(modes) if x != "fp32"])
    return args


class Schedule:
    """Shares the remaining budget among the sections still to run, in proportion to their weights."""

    def __init__(self, budget: Budget, weights: Sequence[float]):
        self.budget = budget
        self.weights = list(weights)

    def next_deadline(self, cap: Optional[float] = None) -> Optional[float]:
        """Deadline of the next section, or None when the budget is spent (the section is skipped)."""
        weight = self.weights[0]
        deadline = self.budget.deadline(weight, sum(self.weights), cap)
        self.weights.pop(0)
        return deadline if self.budget.remaining() > 0 else None


SKIPPED = "skipped: time budget spent"


def _fraction(rates: Dict[str, float], configs: Dict[str, Config], pairs_per_s: float, module: str,
              precision: str, mean_len: float) -> float:
    """Published-loop FLOP/s as a fraction of the device's matrix-product rate in the same mode."""
    return pairs_per_s * flops_per_pair(configs[module], mean_len) / rates[precision]


def run_loop_sections(args, device, configs, rates, report, schedule) -> Dict[str, float]:
    """Per-caption loop vs batched scorer on a block, per model; returns the loop's pairs/s per model."""
    loop_rate: Dict[str, float] = {}
    mean_len = report.meta["mean_len"]
    inputs = random_inputs(configs[args.modules[0]], args.loop_images, args.loop_captions, device, args.seed)
    measurement = f"per-caption loop {args.loop_images}x{args.loop_captions}"
    for module in args.modules:
        deadline = schedule.next_deadline(args.loop_seconds)
        if deadline is None:
            report.add(measurement=measurement, model=module, precision="fp32", note=SKIPPED)
            continue
        model = build(configs[module], device, args.seed)
        res = loop_baseline(model, *inputs, shard=args.loop_shard, deadline=deadline, device=device)
        rate = res["loop_pairs"] / res["loop_seconds"]
        loop_rate[module] = rate
        share = 100.0 * res["loop_pairs"] / res["total_pairs"]
        note = (f"published loop, shards {args.loop_shard}x{args.loop_shard}"
                + ("" if res["complete"] else f"; partial: {share:.0f}% of the block, rate extrapolated"))
        report.add(measurement=measurement, model=module, precision="fp32", pairs=res["loop_pairs"],
                   seconds=res["loop_seconds"], pairs_per_s=rate, complete=res["complete"], note=note,
                   fraction=_fraction(rates, configs, rate, module, "fp32", mean_len))
        brate = res["total_pairs"] / res["batched_seconds"]
        report.add(measurement="batched, same block", model=module, precision="fp32", pairs=res["total_pairs"],
                   seconds=res["batched_seconds"], pairs_per_s=brate, max_diff=res["max_diff"], complete=True,
                   fraction=_fraction(rates, configs, brate, module, "fp32", mean_len),
                   note=f"{brate / rate:.1f}x the loop; diff = vs the loop's scores")
        report.summary[f"{module} per-caption loop on all {args.images}x{args.captions} pairs (extrapolated)"] = \
            _duration(args.images * args.captions / rate)
        del model
        free_device_memory(device)
    del inputs
    free_device_memory(device)
    return loop_rate


def run_scoring_sections(args, device, configs, rates, report, schedule,
                         loop_rate: Dict[str, float]) -> Dict[Tuple[str, str], float]:
    """COCO-5K-sized scoring per model and precision; returns pairs/s per (model, precision)."""
    score_rate: Dict[Tuple[str, str], float] = {}
    mean_len = report.meta["mean_len"]
    measurement = f"scoring {args.images}x{args.captions}"
    inputs = random_inputs(configs[args.modules[0]], args.images, args.captions, device, args.seed)
    for module in args.modules:
        model = build(configs[module], device, args.seed)
        reference: Optional[torch.Tensor] = None
        if device.type == "cuda" and module == args.modules[0] and schedule.budget.remaining() > 0:
            sync_check = count_host_syncs(model, *inputs, device=device)
            report.meta["host_syncs"] = sync_check
            report.summary["host syncs in one scoring call"] = (
                f"{sync_check['syncs']} for {sync_check['chunks']} chunks (torch.cuda.set_sync_debug_mode)")
        for precision in args.precisions:
            deadline = schedule.next_deadline()
            if deadline is None:
                report.add(measurement=measurement, model=module, precision=precision, note=SKIPPED)
                continue
            chunk, res, oom = args.chunk_elements, None, ""
            for _attempt in range(2):
                try:
                    res = score_end_to_end(model, *inputs, precision=precision, deadline=deadline,
                                           chunk_elements=chunk, device=device, label=f"{module} {precision}")
                    break
                except torch.cuda.OutOfMemoryError as exc:           # retry smaller; never lose the table
                    oom = f"out of memory at chunk {chunk or 'auto'}: {str(exc).splitlines()[0][:60]}"
                    free_device_memory(device)
                    chunk = (chunk or default_chunk_elements(device, configs[module].embed_size)) // 4
            if res is None:
                report.add(measurement=measurement, model=module, precision=precision, note=oom)
                continue
            rate = res["pairs"] / res["seconds"] if res["pairs"] else float("nan")
            score_rate[(module, precision)] = rate
            max_diff = None
            if precision == "fp32":
                reference = res["scores"]
            elif reference is not None and res["scores"] is not None:
                max_diff = float((res["scores"] - reference).abs().max())
            share = 100.0 * res["pairs"] / res["total_pairs"]
            projected = res["total_pairs"] / rate if rate == rate and rate > 0 else float("nan")
            note = ("end to end (encode + score + copy to host)" if res["complete"] else
                    f"partial: {share:.0f}% of pairs in its time, all pairs ~{_duration(projected)}")
            if precision == "fp32" and module in loop_rate:
                note += f"; {rate / loop_rate[module]:.0f}x the loop"
            if oom:
                note += f"; first try {oom}; chunk {chunk}"
            report.add(measurement=measurement, model=module, precision=precision, pairs=res["pairs"],
                       seconds=res["seconds"], pairs_per_s=rate, max_diff=max_diff, complete=res["complete"],
                       fraction=_fraction(rates, configs, rate, module, precision, mean_len),
                       projected_seconds=projected, note=note)
            report.summary[f"{module} {precision} scoring of all {args.images}x{args.captions} pairs"] = (
                _duration(projected) + ("" if res["complete"] else " (extrapolated)")
                + (" (target < 60 s)" if precision in ("fp32", "tf32") and not args.quick else ""))
            del res
        del model, reference
        free_device_memory(device)
    del inputs
    free_device_memory(device)
    return score_rate


def run_train_sections(args, device, configs, rates, report, schedule) -> None:
    """Training step per model: batched in each ``--train-precisions`` mode, then the per-caption loop."""
    runs = [(p, False) for p in args.train_precisions] + [("fp32", True)]
    for module in args.modules:
        step_seconds: Dict[Tuple[str, bool], float] = {}
        for precision, per_caption in runs:
            measurement = f"train step B={args.batch_size}, {'per-caption loop' if per_caption else 'batched'}"
            deadline = schedule.next_deadline()
            if deadline is None:
                report.add(measurement=measurement, model=module, precision=precision, note=SKIPPED)
                continue
            try:
                res = train_step_rate(configs[module], device, precision, per_caption, args.batch_size,
                                      args.train_steps, deadline, args.seed)
            except torch.cuda.OutOfMemoryError as exc:
                report.add(measurement=measurement, model=module, precision=precision,
                           note=f"out of memory: {str(exc).splitlines()[0][:80]}")
                continue
            finally:
                free_device_memory(device)
            step_seconds[(precision, per_caption)] = res["step_seconds"]
            pairs = args.batch_size ** 2
            report.add(measurement=measurement, model=module, precision=precision, pairs=pairs * res["steps"],
                       seconds=res["seconds"], pairs_per_s=pairs / res["step_seconds"],
                       step_seconds=res["step_seconds"],
                       note=f"{res['steps']} steps, {1000 * res['step_seconds']:.1f} ms/step")
        loop = step_seconds.get(("fp32", True))
        for precision in args.train_precisions:
            if loop is not None and (precision, False) in step_seconds:
                report.summary[f"{module} train step speed-up over the loop ({precision})"] = (
                    f"{loop / step_seconds[(precision, False)]:.1f}x"
                    + (" (target >= 5x)" if precision == "fp32" and not args.quick else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} asked for, but torch {torch.__version__} sees no CUDA device",
              file=sys.stderr)
        return 2
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)     # tiny problems: more threads only add synchronisation overhead
    budget = Budget(args.time_budget)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                  or platform.machine())
    lengths_probe = coco_like_lengths(args.captions, seed=args.seed)
    mean_len = float(lengths_probe.float().mean())
    configs = {name: model_config(name, args.quick) for name in args.modules}
    meta = dict(device=str(device), device_name=device_name, torch=torch.__version__,
                cuda=torch.version.cuda, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                quick=args.quick, images=args.images, captions=args.captions, mean_len=mean_len,
                loop_block=[args.loop_images, args.loop_captions], loop_shard=args.loop_shard,
                batch_size=args.batch_size, time_budget_s=args.time_budget,
                flops_per_pair={k: flops_per_pair(c, mean_len) for k, c in configs.items()},
                flops_per_pair_batched={k: flops_per_pair(c, mean_len, published=False)
                                        for k, c in configs.items()})
    report = Report(meta, Path(args.json) if args.json else None)
    print(f"# bench_gpu: {device_name} ({device}), torch {torch.__version__}, {meta['date']}, "
          f"budget {args.time_budget:.0f} s", flush=True)

    # 1. matrix-product rate --------------------------------------------------------------------
    rates = {p: matmul_rate(device, p, args.matmul_size, min_seconds=0.3 if args.quick else 1.0)
             for p in PRECISIONS}
    meta["matmul_tflops"] = {p: r / 1e12 for p, r in rates.items()}
    print("matmul TFLOP/s: " + ", ".join(f"{p} {_num(r / 1e12)}" for p, r in rates.items()), flush=True)
    print(report.header(), flush=True)
    for p, r in rates.items():
        report.add(measurement=f"matmul {args.matmul_size}^2", precision=p, seconds=None,
                   flop_per_s=r, note=f"{_num(r / 1e12)} TFLOP/s")

    weights = ([SECTION_WEIGHTS["loop"]] * len(args.modules)
               + [SECTION_WEIGHTS["score_fp32" if p == "fp32" else "score"] for _ in args.modules
                  for p in args.precisions]
               + [SECTION_WEIGHTS["train"]] * (len(args.train_precisions) + 1) * len(args.modules))
    schedule = Schedule(budget, weights)
    ctx = dict(args=args, device=device, configs=configs, rates=rates, report=report, schedule=schedule)
    loop_rate = run_loop_sections(**ctx)
    score_rate = run_scoring_sections(loop_rate=loop_rate, **ctx)
    run_train_sections(**ctx)

    for module in args.modules:
        if (module, "fp32") in score_rate and module in loop_rate:
            report.summary[f"{module} scoring speed-up over the loop (fp32)"] = \
                f"{score_rate[(module, 'fp32')] / loop_rate[module]:.0f}x" + ("" if args.quick else " (target >= 20x)")
    report.summary["total run time"] = f"{budget.elapsed():.0f} s"
    report.save()
    print("\n" + report.markdown(), flush=True)
    if report.json_path is not None:
        print(f"\n(written to {report.json_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
