"""benchmarks/gpu_check.sh, the prepared first-CUDA-run check, works: its --dry-run runs every
check on the CPU at toy sizes and prints the table with no failed row."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # six trainings (two compiled, four under the FSDP launcher): minutes
def test_gpu_check_dry_run_prints_its_table():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    r = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")][1:]  # rows
    checks = [line.split(" | ")[0][2:] for line in table]
    for want in (
        "lora step, bf16",
        "dora step, bf16",
        "host reads per bf16 step",
        "memory embedded qlora",
        "NF4 dequantize",
        "S2-Attn on the flash kernel",
        "train.compile DoRA 3 steps",
        "packing, sdpa",
        "DPO step, reference: adapter off",
        "FSDP2 adalora",
        "FSDP2 lora-drop",
    ):
        assert any(c.startswith(want) for c in checks), (want, checks)
    assert not any(line.endswith("| FAIL |") for line in table), table
