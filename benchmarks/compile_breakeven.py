"""What ``train.compile`` costs and saves, end to end: the figures behind ``train.compile: auto``
(``lorakit/training/runtime.py`` ``COMPILE_MEASURED``).

Runs ``lorakit train`` on the embedded SmolLM2-135M with the demo's settings (LoRA r=16 on all
linear layers, the arithmetic task, batch 8) for ``--steps`` steps, eager and compiled, each in
its own process, one after the other, in the precision asked for. The compiled run uses a fresh
inductor cache (the cold compile a first run pays). From each run's metrics.jsonl:

- eager step = median step time of the eager run (its first step excluded);
- compiled step = median of the compiled run's steps after its first;
- compile cost = what the compiled run spent above its steady step, minus the same excess of
  the eager run (its own first-step costs): sum(compiled) - n x compiled step - (sum(eager) -
  n x eager step). This counts recompiles later in the run (a new shape) as well;
- saved = 1 - compiled step / eager step; break-even = compile cost / (eager - compiled step).

    python benchmarks/compile_breakeven.py [--steps 30] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, steps: int, precision: str, compile_: bool, cache: Path) -> list[float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        f"train.precision={precision}",
        f"train.compile={'true' if compile_ else 'false'}",
        "train.save_every=0",
        "eval.compare_base=false",
        "eval.limit=1",
    ]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        r["step_time_s"] for r in rows if r.get("phase", "train") == "train" and "step_time_s" in r
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        eager = run(tmp / "eager", args.steps, args.precision, False, tmp / "cache")
        compiled = run(tmp / "compiled", args.steps, args.precision, True, tmp / "cache")
    e, c = statistics.median(eager[1:]), statistics.median(compiled[1:])
    n = len(eager)
    cost = (sum(compiled) - n * c) - (sum(eager) - n * e)
    saved = 1 - c / e
    print(f"machine: {machine()}")
    print(f"{args.precision}, {args.steps} steps, LoRA r=16 all-linear, batch 8 (the demo's)")
    print(
        "| eager step (s) | compiled step (s) | saved | compile cost (s, cold cache) "
        "| break-even steps |"
    )
    print("|---|---|---|---|---|")
    even = f"{cost / (e - c):.0f}" if e > c else "never"
    print(f"| {e:.3f} | {c:.3f} | {saved:.1%} | {cost:.1f} | {even} |")
    print(f"end to end: eager {sum(eager):.1f} s, compiled {sum(compiled):.1f} s for {n} steps")
    print("eager steps:", " ".join(f"{t:.2f}" for t in eager))
    print("compiled steps:", " ".join(f"{t:.2f}" for t in compiled))


if __name__ == "__main__":
    main()
