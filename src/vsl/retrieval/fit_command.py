"""``vsl fit-shortlist``: options and output of :func:`vsl.retrieval.fit_shortlist` (one library call)."""
from __future__ import annotations

import argparse

from ..config import SHORTLIST_LOSSES, Config
from .fit import MAX_MEMORY_GB
from .fusion import FUSION_K


def _default(name: str):
    return Config.__dataclass_fields__[name].default


DESCRIPTION = """\
Fit a shortlist head (one global vector per image and caption, for two-stage search) on the training
split of a frozen checkpoint -- published or vsl format -- and write a checkpoint that holds the
original weights unchanged plus the head:

  vsl fit-shortlist --checkpoint SGR+VSL_COCO.pth.tar --data_path DATA --vocab_path VOCAB --out SGR_sl.pth.tar

--fit_fusion then chooses the fusion weight lambda of two-stage scores (exact + lambda * shortlist
cosine) on the dev split and stores it with the head; --keep_head --fit_fusion only chooses lambda
for the head a checkpoint already has.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, help="frozen checkpoint (required)")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="checkpoint to write, with the head (required)")
    parser.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    parser.add_argument("--vocab_path", default=None, help="vocabulary folder (default: the checkpoint's)")
    parser.add_argument("--data_name", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument("--shortlist_dim", type=int, default=None,
                        help="size of the global vectors (default: the checkpoint's, else 256)")
    parser.add_argument("--shortlist_hidden", type=int, default=None,
                        help="width of the head's per-region / per-word ReLU layer; 0 = the linear head on mean "
                             f"embeddings (default: the checkpoint's, else {_default('shortlist_hidden')})")
    parser.add_argument("--shortlist_loss", choices=SHORTLIST_LOSSES, default=None,
                        help=f"the head's loss (default: {_default('shortlist_loss')})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs over the frozen embeddings (default: {_default('shortlist_epochs')})")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"captions per step (default: {_default('shortlist_batch_size')})")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help=f"Adam learning rate (default: {_default('shortlist_learning_rate')})")
    parser.add_argument("--max_memory_gb", type=float, default=MAX_MEMORY_GB,
                        help="memory for the frozen training embeddings; beyond it a random subset of the training "
                             "images is used (default: %(default)s)")
    parser.add_argument("--fit_fusion", action="store_true",
                        help="after fitting, choose the weight lambda of final = exact + lambda * shortlist on the dev "
                             "split (max. dev rsum of the two-stage ranking) and store it with the head (default: off, "
                             "lambda 0 = exact scores only)")
    parser.add_argument("--keep_head", action="store_true",
                        help="with --fit_fusion: keep the checkpoint's head, only choose lambda (default: off)")
    parser.add_argument("--fusion_k", type=int, default=FUSION_K,
                        help="shortlist size of the two-stage ranking that --fit_fusion optimizes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and batches")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")


def run(args: argparse.Namespace) -> int:
    from .fit import fit_shortlist

    result = fit_shortlist(args.checkpoint, args.data_path, args.out, vocab_path=args.vocab_path,
                           data_name=args.data_name, device=args.device, dim=args.shortlist_dim,
                           hidden=args.shortlist_hidden, loss=args.shortlist_loss, epochs=args.epochs,
                           batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                           max_memory_gb=args.max_memory_gb, fit_fusion=args.fit_fusion, keep_head=args.keep_head,
                           fusion_k=args.fusion_k, progress=not args.quiet)
    kind = (f"{result['config']['shortlist_hidden']}-unit" if result["config"]["shortlist_hidden"] else "linear")
    if result["loss_history"]:
        print(f"fitted a {result['config']['shortlist_dim']}-d {kind} shortlist head "
              f"({result['config']['shortlist_loss']}, {len(result['loss_history'])} epochs, final loss "
              f"{result['loss_history'][-1]:.4f}) in {result['seconds']:.1f} s")
    else:
        print(f"kept the checkpoint's {result['config']['shortlist_dim']}-d {kind} shortlist head")
    if result["recall"]:
        print(format_recall(result["recall"], "dev"))
    if result["fusion"]:
        from .fusion import format_fusion

        fusion = result["fusion"]
        print(format_fusion(fusion))
        print(f"fusion weight lambda = {fusion['lambda']:.4g}: dev rsum {fusion['rsum']['fused']:.2f} "
              f"(lambda 0: {fusion['rsum']['plain']:.2f})")
    print(f"wrote {result['out']}")
    return 0


def format_recall(recall, split: str) -> str:
    ks = list(recall["i2t"])
    lines = [f"shortlist recall on {split} (% of queries whose match is in the top K):",
             "  K       " + "".join(f"{k:>8}" for k in ks)]
    for direction in ("i2t", "t2i"):
        lines.append(f"  {direction}     " + "".join(f"{recall[direction][k]:8.1f}" for k in ks))
    return "\n".join(lines)
