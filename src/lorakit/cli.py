"""The ``lorakit`` command: one subcommand per job, each a thin layer over a library function.

A user's mistake (LorakitError) prints one sentence and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from .errors import LorakitError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str):
    """Register ``lorakit NAME``: the decorated function adds its arguments; ``run`` is
    ``<module>:run_<name>`` so heavy imports happen only for the command that runs."""
    def deco(add_args):
        COMMANDS[name] = (help, add_args, add_args.__module__)
        return add_args
    return deco


@command("methods", "list the available methods and presets, one line each")
def _methods_args(p: argparse.ArgumentParser) -> None:
    pass


def run_methods(args) -> int:
    from .registry import describe

    print("\n".join(describe()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from . import commands  # noqa: F401  registers the remaining subcommands
    from . import commands_report  # noqa: F401  compare, inspect

    parser = argparse.ArgumentParser(
        prog="lorakit", description="Fine-tune causal LMs with LoRA, QLoRA, LoRA+, LoRA-FA, "
        "LoRA-drop, AdaLoRA, DoRA and LongLoRA; adapters load in PEFT, vLLM and transformers.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[args.command][2])
    run = getattr(module, "run_" + args.command.replace("-", "_"))
    try:
        return int(run(args) or 0)
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
