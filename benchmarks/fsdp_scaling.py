"""FSDP2 on the embedded model (SmolLM2-135M): what each process holds and how long a step
takes with 1, 2 and 4 CPU processes, in one run.

Each configuration is a real ``lorakit train`` (1 process; then ``accelerate launch`` with an
FSDP config, fsdp_version 2) of LoRA r=16 on every linear layer, the same global batch (4
examples of the built-in task, max_seq_len 256), bf16, a few steps. It prints, per process
count: the frozen-parameter, trainable-parameter, gradient and optimizer-state bytes of each
process (summary.json ``process_bytes``), their ratio to one process's, the median step time
and the peak memory of the training phase (precision auto: bf16 where the CPU has it
natively, else fp32). On 2 cores, 4 processes share the cores: the step
times show the cost of the collectives on one machine, not a speed-up.

    python benchmarks/fsdp_scaling.py [--steps 6] [--procs 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = """distributed_type: FSDP
fsdp_config: {{fsdp_version: 2, fsdp_reshard_after_forward: true,
              fsdp_cpu_ram_efficient_loading: true}}
mixed_precision: 'no'
num_machines: 1
num_processes: {n}
use_cpu: true
"""
GLOBAL_BATCH = 4


def cpu_model() -> str:
    try:
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(n: int, steps: int, root: Path) -> dict:
    out = root / f"p{n}"
    args = [
        "train",
        "model=smollm2-135m",
        f"output_dir={out}",
        "train.precision=auto",
        f"train.max_steps={steps}",
        f"train.batch_size={GLOBAL_BATCH // n}",
        "train.save_every=0",
        "eval.compare_base=false",
        "eval.metric=null",
        "data.max_seq_len=256",
        "data.limit=100",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    if n == 1:
        cmd = [sys.executable, "-m", "lorakit", *args]
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    else:
        cfg = root / f"fsdp{n}.yaml"
        cfg.write_text(CONFIG.format(n=n))
        cmd = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            str(cfg),
            "-m",
            "lorakit",
            *args,
        ]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{n} process(es) failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args()
    mib = 2**20
    ref = None
    print(
        f"# FSDP2 scaling, SmolLM2-135M LoRA r=16 all-linear, precision auto, global batch "
        f"{GLOBAL_BATCH} x <=256 tokens, {a.steps} steps; {cpu_model()}, {os.cpu_count()} "
        "cores",
        flush=True,
    )
    print(
        "| processes | strategy | precision | frozen MiB/proc | trainable MiB/proc | "
        "grad MiB/proc | optimizer MiB/proc | frozen vs 1 proc | median step s | "
        "train peak RSS MiB/proc |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.procs:  # each row as soon as its run is done
            s = run(n, a.steps, Path(tmp))
            p = s["process_bytes"][0]
            ref = ref or p
            peak = s.get("peak_memory_phases_mb", {}).get("train")
            print(
                f"| {n} | {s['distributed']['strategy']} | {s['precision']} | "
                f"{p['frozen_param_bytes'] / mib:.1f} | {p['trainable_param_bytes'] / mib:.2f} | "
                f"{p['grad_bytes'] / mib:.2f} | {p['optimizer_bytes'] / mib:.2f} | "
                f"{p['frozen_param_bytes'] / ref['frozen_param_bytes']:.3f}x | "
                f"{s['median_step_time_s']:.3f} | "
                f"{peak if peak is not None else float('nan'):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
