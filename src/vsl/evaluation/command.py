"""``vsl eval``: one checkpoint or two (the SGRAF ensemble) on a split and protocol -> :func:`vsl.evaluation.evaluate`."""
from __future__ import annotations

import argparse
from typing import Dict

from ..config import PRECISIONS
from ..data.precomp import EVAL_SPLITS
from ..metrics import PROTOCOLS

DESCRIPTION = """\
Evaluate a checkpoint (published .pth.tar or vsl format) on a split, or the SGRAF ensemble of two
(the mean of the two models' score matrices, each model with its own weights and embeddings):

  vsl eval --checkpoint SGR.pth.tar --data_path DATA --vocab_path VOCAB --split testall --protocol coco1k
  vsl eval --checkpoint SGR.pth.tar --checkpoint SAF.pth.tar --data_path DATA --split testall --protocol coco5k

Protocols: coco1k = mean over 5 folds of 1,000 images (COCO testall, as published); coco5k and full =
all images of the split. The vocabulary is {vocab_path}/{data_name}_vocab.json, both from the
checkpoint unless given.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                        help="checkpoint to evaluate (required); give it twice for the SGR+SAF ensemble "
                             "(default: none)")
    parser.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    parser.add_argument("--vocab_path", default=None, help="vocabulary folder (default: the checkpoint's)")
    parser.add_argument("--data_name", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument("--split", choices=EVAL_SPLITS, default="test", help="split to evaluate")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="full",
                        help="coco1k: mean of 5 folds of 1K images; coco5k/full: all images")
    parser.add_argument("--output", metavar="PATH", default=None, help="write the results as JSON (default: none)")
    parser.add_argument("--save_sims", metavar="PATH", default=None,
                        help="save the images x captions score matrix as float32 .npy (default: none)")
    parser.add_argument("--save_ranks", metavar="PATH", default=None,
                        help="save every query's 0-based rank under the protocol as .npz (arrays i2t: one per "
                             "image, t2i: one per caption) (default: none)")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--batch_size", type=int, default=128, help="images/captions per encoding batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="fp32 (exact), tf32 or bf16 scoring (default: the checkpoint's option, fp32)")
    parser.add_argument("--score_chunk", type=int, default=None,
                        help="elements of the largest scoring intermediate per chunk (default: automatic)")
    parser.add_argument("--shortlist", type=int, default=None, metavar="K",
                        help="two-stage evaluation: score only each query's top K by the shortlist head "
                             "(a checkpoint from vsl fit-shortlist), rank the rest by shortlist score (default: off)")
    parser.add_argument("--compare_exhaustive", action="store_true",
                        help="with --shortlist: also score all pairs and report both (default: off)")


def run(args: argparse.Namespace) -> int:
    from .. import metrics
    from ..distributed import cleanup, setup_distributed
    from .run import evaluate

    if args.shortlist is not None:
        return run_eval_shortlist(args)
    info = setup_distributed(args.device)           # torchrun: split the scoring over the processes
    try:
        result = evaluate(args.checkpoint, args.data_path, args.split, args.protocol, vocab_path=args.vocab_path,
                          data_name=args.data_name, device=args.device, batch_size=args.batch_size,
                          output=args.output, save_sims=args.save_sims, progress=not args.quiet,
                          distributed=info, precision=args.precision, score_chunk=args.score_chunk,
                          save_ranks=args.save_ranks)
    finally:
        cleanup()
    if not info.is_main:
        return 0
    what = " + ".join(result["checkpoints"])
    print(f"{what} on {args.split} ({result['images']} images, {result['captions']} captions), "
          f"protocol {args.protocol}:")
    print(metrics.format_table(result))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def run_eval_shortlist(args: argparse.Namespace) -> int:
    from .run import evaluate

    result = evaluate(args.checkpoint, args.data_path, args.split, args.protocol, shortlist=args.shortlist,
                      compare_exhaustive=args.compare_exhaustive, vocab_path=args.vocab_path,
                      data_name=args.data_name, device=args.device, batch_size=args.batch_size, output=args.output,
                      progress=not args.quiet, precision=args.precision, score_chunk=args.score_chunk,
                      save_sims=args.save_sims, save_ranks=args.save_ranks)
    print(format_shortlist(result))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def format_shortlist(result: Dict) -> str:
    """The table of ``vsl eval --shortlist``: metrics, shortlist recall, pairs and time (and exhaustive)."""
    from .. import metrics

    sl = result["shortlist"]
    lines = [f"{' + '.join(result['checkpoints'])} on {result['split']} ({result['images']} images, "
             f"{result['captions']} captions), protocol {result['protocol']}, shortlist K = {sl['k']}:",
             metrics.format_table(result),
             f"shortlist recall at K = {sl['k']}: i2t {sl['recall_i2t']:.1f}%, t2i {sl['recall_t2i']:.1f}%; "
             f"pairs scored {sl['pairs_scored']:,} of {sl['pairs_total']:,} "
             f"({100 * sl['pairs_scored'] / max(1, sl['pairs_total']):.1f}%); {sl['seconds']:.1f} s end to end"]
    ks = list(sl["recall"]["i2t"])
    lines.append("shortlist recall at K " + ", ".join(
        f"{k}: {sl['recall']['i2t'][k]:.1f}/{sl['recall']['t2i'][k]:.1f}" for k in ks) + " (i2t/t2i %)")
    if "exhaustive" in result:
        ex = result["exhaustive"]
        lines += ["exhaustive scoring of the same embeddings:", metrics.format_table(ex),
                  f"exhaustive scoring {ex['seconds_scoring']:.1f} s for {ex['pairs_scored']:,} pairs"]
    if "fusion" in result:
        lines.append(format_fusion_comparison(result["fusion"]))
    return "\n".join(lines)


def format_fusion_comparison(fusion: Dict) -> str:
    """The rankings of ``--compare_exhaustive`` side by side, then their paired differences (95% intervals)."""
    from .. import metrics

    names = list(metrics.TABLE_METRICS)
    labels = {"exhaustive": "exhaustive", "two_stage": "two-stage (lambda 0)",
              "fused": f"fused (lambda {fusion['lambda']:.4g})"}
    width = max(len(v) for v in labels.values()) + 2
    lines = ["rankings of the same embeddings (exact + lambda * shortlist cosine on each shortlist):",
             f"  {'':<{width}}" + "".join(f"{n:>9}" for n in names)]
    for key, label in labels.items():
        lines.append(f"  {label:<{width}}" + "".join(f"{fusion['rankings'][key][n]:9.2f}" for n in names))
    lines.append("paired differences over test images (bootstrap 95% interval):")
    for pair, diffs in fusion["paired"].items():
        cells = ", ".join(f"{n} {diffs[n]['diff']:+.2f} [{diffs[n]['ci95'][0]:+.2f}, {diffs[n]['ci95'][1]:+.2f}]"
                          for n in ("i2t_r1", "t2i_r1", "rsum"))
        lines.append(f"  {pair.replace('_', '-'):<24} {cells}")
    return "\n".join(lines)
