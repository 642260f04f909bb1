"""``vsl train``: the published ``train.py`` flags, verbatim, plus the VSL options -> :func:`vsl.train.train`.

The flags are :class:`vsl.config.Config`'s fields (``--FIELD``); an option left off the command line
stays absent from the namespace, so that the resumed checkpoint's options, ``--preset`` and
``--fast_start`` can fill it (:func:`train_config`). ``vsl ablate`` adds the same flags.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from ..config import FAST_START, MODULE_NAMES, PRECISIONS, PRESETS, SEMANTICS, SHORTLIST_LOSSES, VSL_RANKS, Config

_FIELDS = frozenset(Config.__dataclass_fields__)


def _default(name: str) -> Any:
    return Config.__dataclass_fields__[name].default


def given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The Config fields given on the command line (absent ones are not in the namespace)."""
    return {k: v for k, v in vars(args).items() if k in _FIELDS}


def _config_option(group, *flags: str, dest: str, help: str, **kwargs) -> None:
    """An option that sets ``Config.<dest>``; absent options stay absent (so presets and a resumed
    checkpoint's options can fill them), and the help shows the Config default."""
    default = _default(dest)
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS,
                       help=f"{help} (default: {shown})", **kwargs)


DESCRIPTION = """\
Train SGR or SAF with the Visual Semantic Loss. The published train.py flags are accepted verbatim, e.g.

  vsl train --data_path DATA --vocab_path VOCAB --data_name coco_precomp --batch_size 128 \\
            --num_epochs 25 --lr_update 10 --learning_rate 0.0003 --module_name SGR

Options are resolved in this order: Config defaults < checkpoint options (--resume) < --preset
< --fast_start < flags given on the command line.

Outputs: {model_name}/checkpoint_{E}.pth.tar after epoch E, checkpoint_last.pth.tar (latest, also
mid-epoch every --val_step iterations), model_best.pth.tar (best dev rsum);
{logger_name}/metrics.jsonl and TensorBoard events. --resume PATH continues exactly where PATH stopped.

Compatibility note: as in the published code, passing --max_violation turns hardest-negative
mining OFF and passing --bi_gru turns the bidirectional GRU OFF; prefer the clearer
--no_max_violation and --no_bi_gru (same effect).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="the paper's README settings: "
                          + "; ".join(f"{k}: " + " ".join(f"{f}={v}" for f, v in PRESETS[k].items())
                                      for k in sorted(PRESETS)) + " (default: none)")
    run.add_argument("--resume", metavar="PATH", default=None,
                     help="continue a run from a checkpoint (model, optimizer, epoch, iteration, best rsum, "
                          "RNG states, position in the epoch); its options are the defaults (default: none)")
    _config_option(run, "--seed", dest="seed", type=int, help="random seed of initialisation, shuffling and dropout")
    _config_option(run, "--device", dest="device", help="auto = cuda if available, else cpu; or cpu, cuda, cuda:N")
    _config_option(run, "--precision", dest="precision", choices=PRECISIONS,
                   help="fp32 = exact; tf32 / bf16 = faster matrix products on recent GPUs")
    run.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")

    data = parser.add_argument_group("data (published flags)")
    _config_option(data, "--data_path", dest="data_path", help="folder holding {data_name}/{split}_ims.npy, _caps.txt")
    _config_option(data, "--data_name", dest="data_name", help="dataset folder name: coco_precomp, f30k_precomp, ...")
    _config_option(data, "--vocab_path", dest="vocab_path", help="folder holding {data_name}_vocab.json")
    _config_option(data, "--model_name", dest="model_name", help="output folder of the checkpoints")
    _config_option(data, "--logger_name", dest="logger_name",
                   help="output folder of metrics.jsonl and TensorBoard logs")
    _config_option(data, "--workers", dest="workers", type=int, help="data loader worker processes")
    _config_option(data, "--val_all", dest="val_all", action="store_true",
                   help="validate on all dev captions instead of the first 5,000 (published)")

    opt = parser.add_argument_group("optimisation (published flags)")
    _config_option(opt, "--batch_size", dest="batch_size", type=int, help="captions per batch")
    _config_option(opt, "--num_epochs", dest="num_epochs", type=int, help="epochs to train")
    _config_option(opt, "--lr_update", dest="lr_update", type=int,
                   help="multiply the learning rate by 0.1 every N epochs")
    _config_option(opt, "--learning_rate", dest="learning_rate", type=float, help="initial Adam learning rate")
    _config_option(opt, "--warmup_iters", dest="warmup_iters", type=int,
                   help="linear learning-rate warm-up over the first N iterations (not in the paper)")
    _config_option(opt, "--negatives_warmup_epochs", dest="negatives_warmup_epochs", type=int,
                   help="sum the triplet hinge over all negatives for the first K epochs, then take the "
                        "hardest (not in the paper; 0 = the paper)")
    _config_option(opt, "--negatives_warmup_lr", dest="negatives_warmup_lr", type=float,
                   help="learning rate during the negatives warm-up (default: --learning_rate)")
    opt.add_argument("--fast_start", action="store_true",
                     help="leave the plateau of constant scores early (not in the paper): "
                          + " ".join(f"--{k} {v}" for k, v in FAST_START.items())
                          + "; flags given explicitly still win (default: off)")
    _config_option(opt, "--grad_clip", dest="grad_clip", type=float, help="clip the gradient norm to this (<= 0: off)")
    _config_option(opt, "--margin", dest="margin", type=float, help="triplet loss margin")
    _config_option(opt, "--max_violation", dest="max_violation", action="store_false",
                   help="PUBLISHED QUIRK: passing this flag turns hardest-negative mining OFF (sum over all "
                        "negatives); same as --no_max_violation. Hardest negatives")
    _config_option(opt, "--no_max_violation", dest="max_violation", action="store_false",
                   help="sum the triplet loss over all negatives instead of the hardest one. Hardest negatives")
    _config_option(opt, "--log_step", dest="log_step", type=int, help="log the loss every N iterations")
    _config_option(opt, "--stop_on_plateau", dest="stop_on_plateau", type=int,
                   help="stop (checkpoint_last written, exit 0) after N iterations on the plateau of constant "
                        "scores; 0 = only warn")
    _config_option(opt, "--plateau_spread", dest="plateau_spread", type=float,
                   help="the plateau: standard deviation of the batch's scores at most this x --margin ...")
    _config_option(opt, "--plateau_log_steps", dest="plateau_log_steps", type=int,
                   help="... and triplet loss at its collapsed value (2*B*margin) for N consecutive log steps "
                        "(0 = no detection)")
    _config_option(opt, "--val_step", dest="val_step", type=int,
                   help="validate and write checkpoint_last every N iterations (<= 0: only after epochs)")

    model = parser.add_argument_group("model (published flags)")
    _config_option(model, "--module_name", dest="module_name", choices=MODULE_NAMES, help="similarity network")
    _config_option(model, "--img_dim", dest="img_dim", type=int, help="region feature dimension (must match the data)")
    _config_option(model, "--num_regions", dest="num_regions", type=int, help="regions per image (must match the data)")
    _config_option(model, "--word_dim", dest="word_dim", type=int, help="word embedding dimension")
    _config_option(model, "--embed_size", dest="embed_size", type=int, help="joint embedding dimension")
    _config_option(model, "--sim_dim", dest="sim_dim", type=int, help="similarity vector dimension")
    _config_option(model, "--num_layers", dest="num_layers", type=int, help="GRU layers")
    _config_option(model, "--sgr_step", dest="sgr_step", type=int, help="graph reasoning steps of SGR")
    _config_option(model, "--bi_gru", dest="bi_gru", action="store_false",
                   help="PUBLISHED QUIRK: passing this flag makes the GRU unidirectional; same as --no_bi_gru. "
                        "Bidirectional GRU")
    _config_option(model, "--no_bi_gru", dest="bi_gru", action="store_false",
                   help="use a unidirectional GRU. Bidirectional GRU")
    _config_option(model, "--no_imgnorm", dest="no_imgnorm", action="store_true",
                   help="do not l2-normalise region embeddings")
    _config_option(model, "--no_txtnorm", dest="no_txtnorm", action="store_true",
                   help="do not l2-normalise word embeddings")
    _config_option(model, "--score_chunk", dest="score_chunk", type=int,
                   help="image-caption pairs x words x dims per scoring chunk (None = automatic)")

    loss = parser.add_argument_group("visual semantic loss")
    _config_option(loss, "--vsl_weight", dest="vsl_weight", type=float,
                   help="weight of VSL; 0 = the triplet-only SGR*/SAF* baseline of the ablation tables")
    _config_option(loss, "--vsl_warmup_epochs", dest="vsl_warmup_epochs", type=int,
                   help="train the first N epochs without VSL (not in the paper; used by vsl demo)")
    _config_option(loss, "--vsl_temperature", dest="vsl_temperature", type=float,
                   help="temperature of the soft rank's sigmoid")
    _config_option(loss, "--vsl_rank", dest="vsl_rank", choices=VSL_RANKS,
                   help="released = the formula of the published code; per-image = the ranking of the paper's figure")
    _config_option(loss, "--semantic", dest="semantic", choices=SEMANTICS,
                   help="caption similarity measure: tfidf (published) or cider (CIDEr-D)")
    _config_option(loss, "--textual_semantic_loss", dest="textual_semantic_loss", action="store_true",
                   help="add the textual semantic loss of the ablation (ranks images per caption)")

    head = parser.add_argument_group("shortlist head (two-stage retrieval; not in the paper)")
    _config_option(head, "--shortlist_weight", dest="shortlist_weight", type=float,
                   help="train a shortlist head jointly, its loss times this; 0 = the paper's objective")
    _config_option(head, "--shortlist_dim", dest="shortlist_dim", type=int,
                   help="size of the head's global vectors; 0 = no head (256 when --shortlist_weight is set)")
    _config_option(head, "--shortlist_hidden", dest="shortlist_hidden", type=int,
                   help="width of the head's per-region / per-word ReLU layer; 0 = linear head on mean embeddings")
    _config_option(head, "--shortlist_loss", dest="shortlist_loss", choices=SHORTLIST_LOSSES,
                   help="the head's contrastive loss")


def train_config(args: argparse.Namespace) -> Config:
    """Config of ``vsl train``: defaults < resumed checkpoint < preset < --fast_start < explicit flags."""
    given = given_options(args)
    values: Dict[str, Any] = {}
    if args.resume:
        from ..checkpoint import read_checkpoint
        values.update(read_checkpoint(args.resume)["config"].to_dict())
    if args.preset:
        values.update(PRESETS[args.preset])
    if getattr(args, "fast_start", False):
        values.update(FAST_START)
    values.update(given)
    return Config.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, setup_distributed
    from .trainer import train

    config = train_config(args)
    info = setup_distributed(config.device)         # torchrun: join the process group; else one process
    try:
        summary = train(config, resume=args.resume, progress=not args.quiet, distributed=info)
    finally:
        cleanup()
    if not info.is_main:
        return 0
    if summary["stopped"]:
        print(f"{summary['stopped']}; best dev rsum {summary['best_rsum']:.2f}")
        return 0
    print(f"done: {summary['epoch']} epochs, {summary['iteration']} iterations, best dev rsum "
          f"{summary['best_rsum']:.2f}; checkpoints in {config.model_name}")
    return 0
