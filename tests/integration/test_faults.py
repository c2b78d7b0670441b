"""Faults: kills at named points (halfway through checkpoint and adapter writes, after
optimizer steps; lorakit.faults, no timing luck), the output-folder lock, the NaN stop and a
failed write. Adapters compared in fp32 with tolerance 1e-6."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.cli import main
from tests.conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _args(model_dir, out, *extra):
    return tiny_run_args(
        model_dir,
        out,
        "train.max_steps=24",
        "train.save_every=1",
        "eval.compare_base=false",
        "eval.metric=null",
        "adapter.dropout=0.1",
        "train.resume=true",
        *extra,
    )


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
KILLS = [
    "checkpoint-write:3",
    "after-step:7",
    "checkpoint-write:12",
    "after-step:18",
    "adapter-save",
]


@pytest.mark.slow  # seven training processes: ~35 s
def test_killed_at_each_point_then_resumed_equals_uninterrupted(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *_args(tiny_model_dir, ref)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]

    out = tmp_path / "faulty"
    for point in KILLS:
        r = subprocess.run(
            [sys.executable, "-m", "lorakit", "train", *_args(tiny_model_dir, out)],
            cwd=REPO,
            env=dict(ENV, LORAKIT_TEST_KILL_AT=point),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-2000:])
        assert not (out / "summary.json").exists(), point
    step = max(_checkpoint_steps(out))
    assert step == 23  # the adapter-save kill came after the last checkpoint
    assert any(p.name.startswith(".adapter.tmp-") for p in out.iterdir())  # half-written
    r = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *_args(tiny_model_dir, out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
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
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            *_args(tiny_model_dir, out, "train.max_steps=400"),
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    code = main(
        [
            "train",
            *_args(
                tiny_model_dir,
                out,
                "train.lr=1e30",
                "train.max_grad_norm=null",
                "train.warmup_ratio=0",
            ),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "the loss became" in err and "Traceback" not in err
    steps = _checkpoint_steps(out)
    assert steps, "no good checkpoint was kept"
    good = out / "checkpoints" / f"step-{steps[-1]:06d}"
    assert all(t.isfinite().all() for t in load_file(str(good / "trainable.safetensors")).values())
    assert not (out / "summary.json").exists()


def _full_disk_at(monkeypatch, module, where: str, error):
    """Make ``module.save_file`` raise ``error`` for a file whose path contains ``where`` (a
    disk that fills up at that write); every other write goes through."""
    real = module.save_file

    def filling(tensors, path, *a, **k):
        if where in str(path):
            raise error
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(module, "save_file", filling)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lorakit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


SIX = ("train.max_steps=6", "train.save_every=2")


@pytest.fixture(scope="module")
def six_steps(tiny_model_dir, tmp_path_factory):
    """The adapter of an uninterrupted 6-step run (checkpoints at steps 2 and 4)."""
    ref = tmp_path_factory.mktemp("six") / "ref"
    assert main(["train", *_args(tiny_model_dir, ref, *SIX)]) == 0
    return _adapter(ref)


def test_full_disk_mid_run_says_so_keeps_the_last_checkpoint_and_resumes(
    tiny_model_dir, six_steps, tmp_path, capsys, monkeypatch
):
    """The disk fills up while a checkpoint is written (safetensors' own I/O error, as its
    Rust writer reports ENOSPC), then again while the adapter is written: each time one
    sentence, the checkpoint before intact and nothing half-written; train.resume=true then
    finishes the run with the adapter of an uninterrupted one."""
    from safetensors import SafetensorError

    import lorakit.peft_format as peft_format
    import lorakit.training.checkpoint as ckpt

    six = SIX
    capsys.readouterr()
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # the 2nd checkpoint's 2nd file: after its 1st is written
        _full_disk_at(
            m,
            ckpt,
            "step-000004.tmp-",
            SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            ),
        )
        assert main(["train", *_args(tiny_model_dir, out, *six)]) == 2
    line = _one_error(capsys)
    assert "step-000004: no space left on the disk; free some disk space" in line, line
    assert "then continue with train.resume=true (from the checkpoint of step 2" in line, line
    assert _checkpoint_steps(out) == [2]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert set(load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors")))
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()

    with monkeypatch.context() as m:
        _full_disk_at(m, peft_format, "adapter_model", OSError(errno.ENOSPC, "No space left"))
        assert main(["train", *_args(tiny_model_dir, out, *six)]) == 2
    line = _one_error(capsys)
    assert f"cannot write {out / 'adapter'}: no space left on the disk" in line, line
    assert "(from the checkpoint of step 4, which is intact)" in line, line
    assert _checkpoint_steps(out) == [2, 4]
    assert not (out / "adapter").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter")]

    assert main(["train", *_args(tiny_model_dir, out, *six)]) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = six_steps, _adapter(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_ctrl_c_mid_run_leaves_a_run_that_resumes(
    tiny_model_dir, six_steps, tmp_path, capsys, monkeypatch
):
    """Ctrl-C after step 3 (KeyboardInterrupt inside the loop): exit 130 with a line saying
    how to continue; the run's .lock is left on disk, held by no one, as by a killed
    process, and does not stop the resumed run, which ends as an uninterrupted one."""
    import lorakit.training.loop as loop

    six = SIX

    def ctrl_c(point, step=None):
        if point == "after-step" and step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loop, "kill_point", ctrl_c)
        capsys.readouterr()
        assert main(["train", *_args(tiny_model_dir, out, *six)]) == 130
    err = capsys.readouterr().err
    assert "lorakit: interrupted" in err and "train.resume=true" in err and "Traceback" not in err
    assert _checkpoint_steps(out) == [2]
    # a process that held the lock and was killed: its flock goes with it
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, signal, sys; "
                "fh = open(sys.argv[1], 'w'); fcntl.flock(fh, fcntl.LOCK_EX); "
                "os.kill(os.getpid(), signal.SIGKILL)"
            ),
            str(out / ".lock"),
        ],
        check=False,
    )
    assert (out / ".lock").exists()
    assert main(["train", *_args(tiny_model_dir, out, *six)]) == 0
    a, b = six_steps, _adapter(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
