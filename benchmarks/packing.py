"""Packing on rows of spread lengths: real tokens per second, pad fraction and peak memory of
``data.packing`` false, group_by_length, auto and true, side by side on the same rows.

Each configuration is a real ``lorakit train`` in a fresh process (one at a time): the embedded
SmolLM2-135M, LoRA r=16 on every linear layer, batch 8, one epoch over the first ``--rows``
rows of the built-in ``chat-lengths`` task (log-normal lengths: median ~150 tokens, 95th
percentile ~700, as instruction data spreads; the script prints the measured spread),
``max_seq_len`` 1024, precision auto (bf16 where the CPU has it natively, else fp32). Every
configuration reads the same rows; ``true`` groups them into fewer, fuller steps (an epoch
drops its last partial step in every mode: rows unpacked, packed sequences with ``true``). From
each run's summary.json: steps, pad_fraction (padding tokens / tokens processed),
real_tokens_per_s (the rows' own tokens per second of training), the training phase's peak
resident memory, and their ratios to ``false``. DoRA and LongLoRA (S2-Attn, which ``auto``
pads) are measured too.

    python benchmarks/packing.py [--rows 320] [--only lora,dora,longlora]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from fsdp_scaling import cpu_model  # noqa: E402  (a sibling script, not a package)

#: (method, label, overrides)
VARIANTS = {
    "lora": [
        ("false", ["data.packing=false"]),
        ("group_by_length", ["data.packing=false", "data.group_by_length=true"]),
        ("auto", ["data.packing=auto"]),
        ("true", ["data.packing=true"]),
    ],
    "dora": [("false", ["data.packing=false"]), ("true", ["data.packing=true"])],
    "longlora": [
        ("false", ["data.packing=false"]),
        ("auto (pads: S2-Attn)", ["data.packing=auto"]),
        ("group_by_length", ["data.packing=false", "data.group_by_length=true"]),
    ],
}


def lengths(rows: int, max_len: int) -> list[int]:
    import lorakit as lk
    from lorakit.training.data import encode, read_rows

    _, tok = lk.load_model("smollm2-135m")
    src = read_rows("task:chat-lengths", "train")
    src.rows = src.rows[:rows]
    return [len(e["input_ids"]) for e in encode(src, tok, "auto", max_len).examples]


def run(method: str, overrides: list[str], args, root: Path) -> dict:
    out = root / f"{method}-{abs(hash(tuple(overrides)))}"
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        "model=smollm2-135m",
        f"output_dir={out}",
        f"adapter.method={method}",
        "adapter.r=16",
        "adapter.alpha=32",
        "data.train=task:chat-lengths",
        f"data.limit={args.rows}",
        f"data.max_seq_len={args.max_seq_len}",
        f"train.batch_size={args.batch}",
        "train.epochs=1",
        "train.save_every=0",
        "train.precision=auto",
        "eval.compare_base=false",
        "eval.metric=null",
        "eval.limit=1",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1), TOKENIZERS_PARALLELISM="0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{method} {overrides} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--only", default="lora,dora,longlora")
    args = ap.parse_args()
    ls = sorted(lengths(args.rows, args.max_seq_len))
    q = lambda p: ls[int(p * (len(ls) - 1))]  # noqa: E731
    print(f"# {cpu_model()}, {os.cpu_count()} cores; {len(ls)} rows of task:chat-lengths")
    print(
        f"# row lengths (SmolLM2 tokens, cut at {args.max_seq_len}): median {q(0.5)}, "
        f"p95 {q(0.95)}, max {ls[-1]}, mean {statistics.mean(ls):.0f}"
    )
    print(
        "| method | data.packing | steps | pad fraction | real tok/s | vs false "
        "| peak train MiB | vs false |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.only.split(","):
            ref = None
            for label, overrides in VARIANTS[method]:
                s = run(method, overrides, args, Path(tmp))
                tps, peak = s["real_tokens_per_s"], s["peak_memory_phases_mb"]["train"]
                ref = ref or (tps, peak)
                print(
                    f"| {method} | {label} | {s['total_steps']} | {s['pad_fraction']:.3f} "
                    f"| {tps:.0f} | {tps / ref[0]:.2f}x | {peak:.0f} | {peak / ref[1]:.3f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
