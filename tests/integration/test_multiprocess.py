"""Two processes (DDP over gloo on CPU) follow the loss curve of one process with the same
global batch, and their split evaluation gives one process's figures. Tolerance: 1e-4
absolute on every step's loss (fp32; the only difference is the order of floating-point sums
in the gradient all-reduce)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ddp_launch, tiny_run_args

REPO = Path(__file__).resolve().parents[2]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False
    )


@pytest.mark.skipif(
    shutil.which("accelerate") is None
    and not (Path(sys.executable).parent / "accelerate").exists(),
    reason="accelerate's launcher is not installed",
)
@pytest.mark.slow  # two gloo processes and a reference run: ~20 s
def test_two_processes_match_one_process(tiny_model_dir, tmp_path):
    common = ["eval.compare_base=false", "train.max_steps=5", "train.save_every=0"]
    one = tmp_path / "one"
    r = _run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            *tiny_run_args(tiny_model_dir, one, *common, "train.batch_size=4"),
        ]
    )
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    r = _run(
        [
            *ddp_launch(2),
            "lorakit",
            "train",
            *tiny_run_args(tiny_model_dir, two, *common, "train.batch_size=2"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    # the evaluation is split over the two processes and gathered: one process's figures
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (one, two))
    assert sb["distributed"] == {"strategy": "ddp", "processes": 2}
    for key in ("valid_loss", "general_text_loss", "exact_match", "f1"):
        assert sb["tuned"][key] == pytest.approx(sa["tuned"][key], rel=1e-5, abs=1e-7), key
    preds = [(p / "predictions.jsonl").read_text().splitlines() for p in (one, two)]
    assert len(preds[0]) == len(preds[1]) > 0
