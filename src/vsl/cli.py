"""The ``vsl`` command line (also ``python -m vsl``): a table of commands, each a program module.

Every entry of :data:`COMMANDS` names a module that exports ``add_arguments(parser)`` and
``run(args) -> exit status`` (and optionally ``DESCRIPTION``, the text of its ``--help``); this
module only builds the parsers from the table, with one help formatter and one error handling:
user errors (:class:`vsl.errors.VSLError`) print ``vsl: error: <one line>`` and exit with status 2.

Flags are spelled with underscores, as the published code's are (``--data_path``); a hyphenated
spelling of any flag (``--data-seed``, ``--test-images``, ``--no-thumbnails``) is accepted as the
same flag and not listed in the help.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence, Tuple

from .errors import VSLError

#: (command, module, one-line help), in the order ``vsl --help`` lists them.
COMMANDS: Tuple[Tuple[str, str, str], ...] = (
    ("train", "vsl.train.command", "train SGR/SAF with VSL (published flags accepted)"),
    ("eval", "vsl.evaluation.command", "evaluate one checkpoint or the SGRAF ensemble of two"),
    ("make-demo-data", "vsl.demo.data_command", "write the procedural demo dataset (SCAN layout)"),
    ("demo", "vsl.demo.run", "train SGR with and without VSL on the demo data and compare"),
    ("ablate", "vsl.ablate.command", "an ablation study: arms x seeds, means with 95%% intervals, paired tests"),
    ("fit-shortlist", "vsl.retrieval.fit_command", "fit a shortlist head on a frozen checkpoint"),
    ("extract", "vsl.extract.command", "BUTD region features of a folder of photos (SCAN layout)"),
    ("index", "vsl.retrieval.index_command", "encode a split or a feature folder into a searchable index"),
    ("search", "vsl.retrieval.search_command", "search an index: text -> images or image -> captions"),
    ("serve", "vsl.serve.command", "a search page and JSON API over an index (default: the demo's)"),
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``--some-flag`` as ``--some_flag`` when only the latter exists."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._underscored(a) for a in args], namespace)

    def _underscored(self, arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, eq, value = arg.partition("=")
        spelled = "--" + flag[2:].replace("-", "_")
        if flag in self._option_string_actions or spelled not in self._option_string_actions:
            return arg
        return spelled + eq + value


def build_parser() -> argparse.ArgumentParser:
    """The ``vsl`` parser with one sub-parser per entry of :data:`COMMANDS`."""
    from . import __version__

    parser = _Parser(prog="vsl", description="Image-text retrieval with the Visual Semantic Loss (ICME 2023) on SGR, "
                     "SAF and SGRAF.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"vsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, formatter_class=_Formatter,
                           description=getattr(module, "DESCRIPTION", help_text.replace("%%", "%")))
        module.add_arguments(p)
        p.set_defaults(handler=module.run, command_parser=p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vsl`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:          # reported by the command's own parser, so that its usage is shown
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.handler(args) or 0)
    except VSLError as exc:
        message = " ".join(str(exc).split())           # always one line
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def train_config(args: argparse.Namespace):
    """The Config of parsed ``vsl train`` options (:func:`vsl.train.train_config`)."""
    from .train import train_config as resolve

    return resolve(args)


if __name__ == "__main__":
    sys.exit(main())
