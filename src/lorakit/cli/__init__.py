"""The ``lorakit`` command: one subcommand per job, each a thin layer over a library function.

:data:`COMMANDS` is the table of subcommands. ``lorakit NAME`` calls ``NAME_args(parser)`` and
``run_NAME(args)`` of the module the table names; the engine never imports this package.
A user's mistake (LorakitError) prints one sentence and exits with code 2, no traceback; so
does a file-system error (a full disk, no permission), named by :func:`files.file_error`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import LorakitError
from ..files import file_error
from ..version import __version__
from . import analysis, commands

#: lorakit NAME -> (module with NAME_args and run_NAME, one-line help)
COMMANDS = {
    "train": (commands, "fine-tune a model: lorakit train [CONFIG.yaml] [section.key=value ...]"),
    "eval": (
        commands,
        "evaluate an adapter (or --base MODEL): loss and generation metrics, as JSON",
    ),
    "generate": (commands, 'generate a completion: lorakit generate ADAPTER "prompt"'),
    "chat": (commands, "chat with an adapter in the terminal (empty line or Ctrl-D ends)"),
    "merge": (
        commands,
        "merge an adapter into its base and save a plain transformers model folder",
    ),
    "export": (
        commands,
        (
            "write an adapter of any method as plain LoRA for serving: a PEFT "
            "folder (--to lora), vLLM-checked (--to vllm) or a llama.cpp GGUF (--to gguf)"
        ),
    ),
    "compare": (
        analysis,
        (
            "train several methods on the same model, data, seed and budget, and "
            "write a report (Markdown + HTML with plots)"
        ),
    ),
    "inspect": (
        analysis,
        (
            "per-layer analysis of an adapter: ||ΔW||, effective rank and each "
            "method's own figures; text and PNG plots"
        ),
    ),
    "methods": (commands, "list the available methods and presets, one line each"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Fine-tune causal LMs with LoRA, QLoRA, LoRA+, LoRA-FA, LoRA-drop, "
        "AdaLoRA, DoRA and LongLoRA; adapters load in PEFT and lorakit; `lorakit export` "
        "writes any of them as plain LoRA (checked against vLLM's rules) or as a llama.cpp "
        "GGUF adapter.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"{name}_args")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    run = getattr(COMMANDS[args.command][0], f"run_{args.command}")
    try:
        return int(run(args) or 0)
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        more = (
            "; the run folder is kept: train.resume=true continues from its last checkpoint"
            if args.command == "train"
            else ""
        )
        print(f"lorakit: interrupted{more}", file=sys.stderr)
        return 130
    except Exception as e:
        err = file_error(e, "access")  # one a command did not word itself: still one sentence
        if err is None:
            raise
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
