"""``lorakit compare`` and ``lorakit inspect``: the side-by-side report and the per-layer analysis.

Each parses its arguments and calls one function of lorakit.analysis.
"""

from __future__ import annotations

import argparse
import sys

from ..analysis.compare import (
    COMPARE_DEFAULTS,
    DEFAULT_METHODS,
    LONG_DEFAULTS,
    LR_GRID,
    QUICK_DEFAULTS,
    compare,
)
from ..analysis.inspection import inspect_adapters, text_report
from ..analysis.pages import md_table
from ..analysis.report import main_table
from ..config import split_config_args


def compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|key=value",
        help="an optional YAML run config, then dotted overrides applied to every "
        "method's run; compare's budget "
        + ", ".join(f"{k}={v}" for k, v in COMPARE_DEFAULTS.items())
        + " applies where these leave it unset",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods and presets run on the task of the config "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default="runs/compare",
        help="folder of the runs and the report; finished runs in it are not "
        "run again (default: %(default)s)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run every row N times with seeds seed, seed+1, ...; the report shows "
        "mean and standard deviation, and a difference within the spread is "
        "a tie (default: 1, spread = standard error over the eval examples)",
    )
    p.add_argument(
        "--lr-sweep",
        action="store_true",
        help="also run each row at "
        + ", ".join(f"{f:g}x" for f in LR_GRID if f != 1)
        + " its learning rate; the lowest validation loss is the row",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a first look (about 14 min on 2 CPU cores): "
        + ", ".join(f"{k}={v}" for k, v in QUICK_DEFAULTS.items())
        + " and a shorter long-context suite",
    )
    p.add_argument(
        "--no-long",
        dest="long_context",
        action="store_false",
        help="skip the long-context suite (LongLoRA's S2-Attn vs full attention on task:passkey)",
    )
    p.add_argument(
        "--long-steps",
        type=int,
        metavar="N",
        help=f"steps of the long-context runs (default {LONG_DEFAULTS['train.max_steps']})",
    )
    p.add_argument(
        "--long-len",
        type=int,
        metavar="TOKENS",
        help=f"max_seq_len of the pass-key rows (default "
        f"{LONG_DEFAULTS['data.max_seq_len']}; rows are 50-85%% of it)",
    )


def run_compare(args) -> int:
    config, overrides = split_config_args(args.items)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = compare(
        config,
        overrides,
        methods,
        args.out,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        seeds=args.seeds,
        lr_sweep=args.lr_sweep,
        long_context=args.long_context,
        quick=args.quick,
        long_steps=args.long_steps,
        long_len=args.long_len,
    )
    print(
        md_table(
            ["claim", "verdict", "figures"],
            [[c["claim"], c["verdict"], c["figures"]] for c in report["claims"]],
        )
    )
    print()
    print(md_table(*main_table(report["rows"] + report["long_rows"])))
    for x in report["missing"]:
        print(f"{x['method']}: {x['status']} {x['reason']}".rstrip())
    return 0 if not any(x["status"] == "failed" for x in report["missing"]) else 1


def inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder (or a full fine-tuned model folder)")
    p.add_argument(
        "--vs", metavar="OTHER", help="a second adapter of the same base, overlaid in every plot"
    )
    p.add_argument(
        "--out",
        help="folder for the plots, inspect.txt/json/html (default: "
        "'inspect' next to the adapter folder)",
    )
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")


def run_inspect(args) -> int:
    results, out = inspect_adapters(args.adapter, args.vs, args.out, args.model)
    print("\n\n".join(text_report(r) for r in results))
    print(f"plots: {out}")
    return 0
