"""The ``vsl`` command line (also ``python -m vsl``): argument parsing only, then one library call.

* ``vsl train``: the published ``train.py`` flags, verbatim, plus the VSL options -> :func:`vsl.train.train`
* ``vsl eval``: one checkpoint or two (SGRAF ensemble) on a split and protocol -> :func:`vsl.evaluate.evaluate`
* ``vsl make-demo-data`` / ``vsl demo``: the procedural demo dataset and the demo run.
* ``vsl ablate``: a study's arms x seeds (the ``vsl train`` flags pass through) -> :func:`vsl.ablate.run.run`
* ``vsl serve``: the search page and JSON API over an index -> :func:`vsl.serve.serve`

User errors (:class:`vsl.errors.VSLError`) print ``vsl: error: <one line>`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from .config import FAST_START, MODULE_NAMES, PRECISIONS, PRESETS, SEMANTICS, SHORTLIST_LOSSES, VSL_RANKS, Config
from .data.precomp import EVAL_SPLITS
from .errors import VSLError
from .metrics import PROTOCOLS

_DEFAULTS = Config.__dataclass_fields__


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _default(name: str) -> Any:
    return _DEFAULTS[name].default


def _config_option(group, *flags: str, dest: str, help: str, **kwargs) -> None:
    """An option that sets ``Config.<dest>``; absent options stay absent (so presets and a resumed
    checkpoint's options can fill them), and the help shows the Config default."""
    default = _default(dest)
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS,
                       help=f"{help} (default: {shown})", **kwargs)


# ------------------------------------------------------------------------------------------------
# vsl train
# ------------------------------------------------------------------------------------------------
TRAIN_DESCRIPTION = """\
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
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
    _config_option(opt, "--plateau_std", dest="plateau_std", type=float,
                   help="the plateau: standard deviation of the batch's scores below this ...")
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
    fields = set(_DEFAULTS)
    given = {k: v for k, v in vars(args).items() if k in fields}
    values: Dict[str, Any] = {}
    if args.resume:
        from .checkpoint import read_checkpoint
        values.update(read_checkpoint(args.resume)["config"].to_dict())
    if args.preset:
        values.update(PRESETS[args.preset])
    if getattr(args, "fast_start", False):
        values.update(FAST_START)
    values.update(given)
    return Config.from_dict(values)


def run_train(args: argparse.Namespace) -> int:
    from .distributed import cleanup, setup_distributed
    from .train import train

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


# ------------------------------------------------------------------------------------------------
# vsl eval
# ------------------------------------------------------------------------------------------------
EVAL_DESCRIPTION = """\
Evaluate a checkpoint (published .pth.tar or vsl format) on a split, or the SGRAF ensemble of two
(the mean of the two models' score matrices, each model with its own weights and embeddings):

  vsl eval --checkpoint SGR.pth.tar --data_path DATA --vocab_path VOCAB --split testall --protocol coco1k
  vsl eval --checkpoint SGR.pth.tar --checkpoint SAF.pth.tar --data_path DATA --split testall --protocol coco5k

Protocols: coco1k = mean over 5 folds of 1,000 images (COCO testall, as published); coco5k and full =
all images of the split. The vocabulary is {vocab_path}/{data_name}_vocab.json, both from the
checkpoint unless given.
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_eval(args: argparse.Namespace) -> int:
    from . import metrics
    from .distributed import cleanup, setup_distributed
    from .evaluation import evaluate

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
    from .retrieval.twostage import evaluate_shortlist, format_shortlist

    if args.save_sims:
        from .errors import ConfigError
        raise ConfigError("--save_sims needs the exhaustive score matrix; drop it or --shortlist")
    result = evaluate_shortlist(args.checkpoint, args.data_path, args.split, args.protocol, shortlist=args.shortlist,
                                compare_exhaustive=args.compare_exhaustive, vocab_path=args.vocab_path,
                                data_name=args.data_name, device=args.device, batch_size=args.batch_size,
                                output=args.output, progress=not args.quiet, precision=args.precision,
                                score_chunk=args.score_chunk)
    print(format_shortlist(result))
    if args.output:
        print(f"wrote {args.output}")
    return 0


# ------------------------------------------------------------------------------------------------
# retrieval commands (vsl.retrieval.commands holds their options and output)
# ------------------------------------------------------------------------------------------------
def _add_retrieval_commands(sub) -> None:
    from .retrieval import commands

    for name, help_text, description, add, run in (
            ("fit-shortlist", "fit a shortlist head on a frozen checkpoint", commands.FIT_DESCRIPTION,
             commands.add_fit_arguments, commands.run_fit),
            ("index", "encode a split or a feature folder into a searchable index", commands.INDEX_DESCRIPTION,
             commands.add_index_arguments, commands.run_index),
            ("search", "search an index: text -> images or image -> captions", commands.SEARCH_DESCRIPTION,
             commands.add_search_arguments, commands.run_search)):
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=_Formatter)
        add(p)
        p.set_defaults(handler=run, command_parser=p)


# ------------------------------------------------------------------------------------------------
# demo commands (modules imported only when used)
# ------------------------------------------------------------------------------------------------
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from .demo.run import add_arguments
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.demo":
            raise
        parser.add_argument("out", nargs="?", default="./demo", help="working folder of the demo")
        parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
        return
    add_arguments(parser)


def run_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo as run

    return int(run(args) or 0)


def run_make_demo_data(args: argparse.Namespace) -> int:
    from .demo.data import run

    return int(run(args) or 0)


def run_ablate(args: argparse.Namespace) -> int:
    from .ablate.run import run

    return run(args, given={k: v for k, v in vars(args).items() if k in _DEFAULTS})


# ------------------------------------------------------------------------------------------------
# vsl serve
# ------------------------------------------------------------------------------------------------
SERVE_DESCRIPTION = """\
Serve a search page (/) and a JSON API (/api/search, /api/info, /api/health; docs at /docs) over an
index written by `vsl index`. The model and index are loaded once; searches run on a thread pool,
queries arriving within --batch_window_ms of each other share one batched search.

With no --index, serves the demo: builds once (cached in --demo_dir) the demo dataset, an SGR+VSL
model trained with the demo recipe, its shortlist head and the test split's index.
"""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", metavar="DIR", default=None,
                        help="index folder written by `vsl index` (default: the demo index, built once)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless told otherwise)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    parser.add_argument("--workers", type=int, default=0, help="search threads (0 = one per CPU core)")
    parser.add_argument("--batch_window_ms", type=float, default=2.0,
                        help="how long a query waits for others to share its batched search")
    parser.add_argument("--max_batch", type=int, default=32, help="largest batch of queries (1 = no batching)")
    parser.add_argument("--thumbnails", metavar="DIR", default=None,
                        help="folder of {image_id}.png pictures of the gallery (default: the demo's, "
                             "or none)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--demo_dir", metavar="DIR", default="./vsl-demo",
                        help="working folder of the demo index (used without --index)")
    parser.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info",
                        help="uvicorn's log level")


def run_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.index, args.host, args.port, workers=args.workers or None, batch_window_ms=args.batch_window_ms,
          max_batch=args.max_batch, thumbnails=args.thumbnails, device=args.device, demo_dir=args.demo_dir,
          log_level=args.log_level)
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo.data import add_arguments as add_demo_data_arguments

    parser = argparse.ArgumentParser(prog="vsl", description="Image-text retrieval with the Visual Semantic Loss "
                                     "(ICME 2023) on SGR, SAF and SGRAF.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"vsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train SGR/SAF with VSL (published flags accepted)",
                       description=TRAIN_DESCRIPTION, formatter_class=_Formatter)
    add_train_arguments(p)
    p.set_defaults(handler=run_train, command_parser=p)

    p = sub.add_parser("eval", help="evaluate one checkpoint or the SGRAF ensemble of two",
                       description=EVAL_DESCRIPTION, formatter_class=_Formatter)
    add_eval_arguments(p)
    p.set_defaults(handler=run_eval, command_parser=p)

    p = sub.add_parser("make-demo-data", help="write the procedural demo dataset (SCAN layout)",
                       description="Write a small procedural dataset in the SCAN layout, with its vocabulary.",
                       formatter_class=_Formatter)
    add_demo_data_arguments(p)
    p.set_defaults(handler=run_make_demo_data, command_parser=p)

    p = sub.add_parser("demo", help="train SGR with and without VSL on the demo data and compare",
                       description="Train SGR with and without VSL on the demo data at reduced size and "
                                   "compare them.", formatter_class=_Formatter)
    add_demo_arguments(p)
    p.set_defaults(handler=run_demo, command_parser=p)

    from .ablate.run import ABLATE_DESCRIPTION, add_arguments as add_ablate_arguments
    p = sub.add_parser("ablate", help="an ablation study: arms x seeds, means with 95%% intervals, paired tests",
                       description=ABLATE_DESCRIPTION, formatter_class=_Formatter)
    add_ablate_arguments(p)
    add_train_arguments(p)
    p.set_defaults(handler=run_ablate, command_parser=p)
    _add_retrieval_commands(sub)

    p = sub.add_parser("serve", help="a search page and JSON API over an index (default: the demo's)",
                       description=SERVE_DESCRIPTION, formatter_class=_Formatter)
    add_serve_arguments(p)
    p.set_defaults(handler=run_serve, command_parser=p)

    from . import extract
    p = sub.add_parser("extract", help="region features of a folder of photos (SCAN layout)",
                       description=extract.DESCRIPTION, formatter_class=_Formatter)
    extract.add_arguments(p)
    p.set_defaults(handler=extract.run, command_parser=p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vsl`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:          # reported by the command's own parser, so that its usage is shown
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except VSLError as exc:
        message = " ".join(str(exc).split())           # always one line
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
