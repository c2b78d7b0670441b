"""Faults: kills at named points (halfway through checkpoint and adapter writes, after
optimizer steps; lorakit.faults, no timing luck), the output-folder lock, the NaN stop and a
failed write. Adapters compared in fp32 with tolerance 1e-6."""

from __future__ import annotations

import pytest

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from lorakit.cli import main
from tests.conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _args(model_dir, out, *extra):
    return tiny_run_args(model_dir, out, "train.max_steps=24", "train.save_every=1",
                         "eval.compare_base=false", "eval.metric=null", "adapter.dropout=0.1",
                         "train.resume=true", *extra)


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-"))


def _adapter(out: Path):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


#: where the faulty run is killed, one process after another (lorakit.faults): twice halfway
#: through a checkpoint write, twice right after an optimizer step, once halfway through
#: writing the final adapter
KILLS = ["checkpoint-write:3", "after-step:7", "checkpoint-write:12", "after-step:18",
         "adapter-save"]


@pytest.mark.slow  # seven training processes: ~35 s
def test_killed_at_each_point_then_resumed_equals_uninterrupted(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "lorakit", "train", *_args(tiny_model_dir, ref)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    out = tmp_path / "faulty"
    for point in KILLS:
        r = subprocess.run([sys.executable, "-m", "lorakit", "train",
                            *_args(tiny_model_dir, out)], cwd=REPO,
                           env=dict(ENV, LORAKIT_TEST_KILL_AT=point), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-2000:])
        assert not (out / "summary.json").exists(), point
    step = max(_checkpoint_steps(out))
    assert step == 23  # the adapter-save kill came after the last checkpoint
    assert any(p.name.startswith(".adapter.tmp-") for p in out.iterdir())  # half-written
    r = subprocess.run([sys.executable, "-m", "lorakit", "train", *_args(tiny_model_dir, out)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    assert not any(p.name.startswith(".adapter.") for p in out.iterdir())
    a, b = _adapter(ref), _adapter(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 24  # replayed steps are not logged twice


def test_second_run_on_the_same_folder_refuses(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "lorakit", "train",
                          *_args(tiny_model_dir, out, "train.max_steps=400")],
                         cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _checkpoint_steps(out):
            time.sleep(0.05)
        assert _checkpoint_steps(out), "the first run never started training"
        code = main(["train", *_args(tiny_model_dir, out)])
        err = capsys.readouterr().err
        assert code == 2 and "another lorakit run is using" in err and "Traceback" not in err
    finally:
        p.kill()
        p.wait()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *_args(tiny_model_dir, out, "train.lr=1e30",
                                 "train.max_grad_norm=null", "train.warmup_ratio=0")])
    err = capsys.readouterr().err
    assert code == 2 and "the loss became" in err and "Traceback" not in err
    steps = _checkpoint_steps(out)
    assert steps, "no good checkpoint was kept"
    good = out / "checkpoints" / f"step-{steps[-1]:06d}"
    assert all(t.isfinite().all() for t in load_file(str(good / "trainable.safetensors")).values())
    assert not (out / "summary.json").exists()


def test_failed_checkpoint_write_is_a_clear_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import lorakit.training.checkpoint as ckpt

    real = ckpt.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += "trainable" in str(path)
        if calls["n"] == 2 and "trainable" in str(path):  # the 2nd checkpoint's first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    out = tmp_path / "run"
    code = main(["train", *_args(tiny_model_dir, out, "train.save_every=2", "adapter.dropout=0")])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "could not write checkpoint" in err and "No space left" in err
    assert "Traceback" not in err
    assert _checkpoint_steps(out) == [2]
    intact = out / "checkpoints" / "step-000002"
    assert set(load_file(str(intact / "trainable.safetensors")))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
