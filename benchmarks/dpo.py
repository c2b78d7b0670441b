"""DPO against SFT on the embedded model: the cost of a step, and SFT then DPO end to end.

``--cost`` (the default): three real ``lorakit train`` runs in fresh processes, one at a time,
on the same 256 pairs of ``task:arithmetic-pref`` (SmolLM2-135M, LoRA r=16 on every linear
layer, batch 8, precision auto): SFT on the prompts with their chosen answers, DPO with the
reference from the adapter switched off, and DPO with the reference precomputed once. It
prints the median step time, the training phase's peak resident memory and the exact
memory's parameter bytes, with ratios to SFT.

``--quality``: the recipe of docs/preference.md on the built-in tasks: SFT on ``arithmetic``
(the default run: 250 steps of batch 8), ``lorakit merge``, then DPO on ``arithmetic-pref``
from the merged model, whose figures before (the SFT model) and after (the DPO model) are
the held-out preference accuracy and margin and the exact match on the test questions.

The defaults are the README's RPO column (``dpo.loss: [sigmoid, sft]``, weights [1, 4], lr
1e-4); ``--loss sigmoid --loss-weights '' --lr 5e-5`` is its plain DPO column.

    python benchmarks/dpo.py [--cost] [--quality] [--dpo-steps 100] [--lr 1e-4]
        [--beta 0.1] [--loss sigmoid,sft] [--loss-weights 1,4] [--out runs/bench-dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from fsdp_scaling import cpu_model  # noqa: E402  (a sibling script, not a package)


def lorakit(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    r = subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"lorakit {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def cost(root: Path, steps: int) -> None:
    common = [
        "model=smollm2-135m",
        "adapter.r=16",
        "adapter.alpha=32",
        "data.limit=256",
        "train.batch_size=8",
        f"train.max_steps={steps}",
        "train.save_every=0",
        "eval.compare_base=false",
        "eval.metric=null",
        "eval.limit=1",
    ]
    runs = {
        "SFT (prompt + chosen)": ["data.train=task:arithmetic"],
        "DPO (reference: adapter off)": [
            "train.objective=dpo",
            "data.train=task:arithmetic-pref",
        ],
        "DPO (reference precomputed)": [
            "train.objective=dpo",
            "data.train=task:arithmetic-pref",
            "dpo.precompute_ref_log_probs=true",
        ],
    }
    print(f"# {cpu_model()}, {os.cpu_count()} cores; batch 8 (pairs or rows), {steps} steps")
    print("| run | median step s | vs SFT | peak train MiB | vs SFT | params bytes |")
    print("|---|---|---|---|---|---|")
    ref = None
    for i, (label, extra) in enumerate(runs.items()):
        out = root / f"cost{i}"
        lorakit("train", f"output_dir={out}", *common, *extra)
        s = summary(out)
        t, peak = s["median_step_time_s"], s["peak_memory_phases_mb"]["train"]
        ref = ref or (t, peak)
        params = s["exact_memory"]["params_bytes"]
        note = f" (+{s['dpo_reference_s']:.0f} s up front)" if "dpo_reference_s" in s else ""
        print(
            f"| {label}{note} | {t:.3f} | {t / ref[0]:.2f}x | {peak:.0f} | "
            f"{peak / ref[1]:.3f}x | {params:,} |",
            flush=True,
        )


def quality(root: Path, dpo_steps: int, lr: float, beta: float, loss: str, weights: str) -> None:
    sft, merged, dpo = root / "sft", root / "sft-merged", root / "dpo"
    if not (sft / "summary.json").exists():
        lorakit("train", f"output_dir={sft}")
    if not merged.exists():
        lorakit("merge", str(sft / "adapter"), "--out", str(merged))
    lorakit(
        "train",
        f"model={merged}",
        f"output_dir={dpo}",
        "train.objective=dpo",
        "data.train=task:arithmetic-pref",
        f"train.max_steps={dpo_steps}",
        f"train.lr={lr}",
        f"dpo.beta={beta}",
        f"dpo.loss=[{loss}]",
        f"dpo.loss_weights={f'[{weights}]' if weights else 'null'}",
    )
    s = summary(dpo)
    print(
        f"# {cpu_model()}; SFT: the default run; DPO: {dpo_steps} steps, lr {lr}, beta {beta}, "
        f"loss [{loss}], weights [{weights or '1 each'}]"
    )
    print("| held-out (arithmetic-pref test split) | SFT | SFT then DPO |")
    print("|---|---|---|")
    for key in ("pref_accuracy", "pref_margin", "exact_match", "valid_loss", "general_text_loss"):
        print(f"| {key} | {s['base'][key]:.4f} | {s['tuned'][key]:.4f} |")
    print(f"SFT run: {summary(sft)['tuned']['exact_match']:.4f} exact match on arithmetic's test")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--steps", type=int, default=12, help="steps of each cost run")
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument(
        "--loss", default="sigmoid,sft", help="dpo.loss terms, comma-separated (sigmoid: DPO alone)"
    )
    ap.add_argument(
        "--loss-weights", default="1,4", help="dpo.loss_weights, comma-separated ('': 1 each)"
    )
    ap.add_argument("--out", default=None, help="keep the quality runs here (default: temp)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        if a.cost or not a.quality:
            cost(root, a.steps)
        if a.quality:
            quality(root, a.dpo_steps, a.lr, a.beta, a.loss, a.loss_weights)


if __name__ == "__main__":
    main()
