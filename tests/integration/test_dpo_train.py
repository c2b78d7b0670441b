"""DPO through ``lorakit train train.objective=dpo`` on the tiny model, fp32: every method
trains and logs TRL's metrics, the reference costs no second copy of the frozen weights (the
exact memory's parameter bytes equal the SFT run's), full fine-tuning precomputes its
reference once and stores it, a killed run resumes to the uninterrupted one, two processes
(DDP, FSDP2) follow one process's loss curve, and ``lorakit eval`` scores held-out pairs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.training.dpo import METRICS, REFERENCE_FILE
from lorakit.training.tasks import get_task
from tests.conftest import ddp_launch, killed_run, task_rows_file, tiny_run_args, train_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return task_rows_file(tmp_path_factory.mktemp("pairs"), "arithmetic-pref", 48)


def _args(model_dir, out, data: Path, *extra) -> list[str]:
    return [
        "train",
        *tiny_run_args(
            model_dir,
            out,
            "train.objective=dpo",
            f"data.train={data}",
            "train.max_steps=3",
            "train.save_every=0",
            "eval.compare_base=false",
            "eval.limit=4",
            *extra,
        ),
    ]


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == "train"]


METHODS = [
    pytest.param("adapter.method=lora", id="lora"),
    pytest.param("adapter.method=adalora", id="adalora"),
    pytest.param("adapter.method=lora-drop", id="lora-drop"),
    pytest.param("adapter.method=full", id="full"),
    pytest.param("adapter.method=qlora", id="qlora", marks=pytest.mark.slow),
    pytest.param("adapter.method=lora+", id="lora-plus", marks=pytest.mark.slow),
    pytest.param("adapter.method=lora-fa", id="lora-fa", marks=pytest.mark.slow),
    pytest.param("adapter.method=dora", id="dora", marks=pytest.mark.slow),
    pytest.param("adapter.method=longlora", id="longlora", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_dpo(tiny_model_dir, tmp_path, capsys, pairs_file, method):
    out = tmp_path / "run"
    summary, err = train_cli(capsys, _args(tiny_model_dir, out, pairs_file, method))
    assert summary["objective"] == "dpo"
    rows = _rows(out)
    assert len(rows) == 3 and all(set(METRICS) <= set(r) for r in rows)
    assert all(0 <= r["rewards/accuracies"] <= 1 for r in rows)
    tuned = summary["tuned"]
    assert 0 <= tuned["pref_accuracy"] <= 1 and "exact_match" in tuned
    precomputed = (out / REFERENCE_FILE).exists()
    assert precomputed == (method == "adapter.method=full"), err[-2000:]
    if precomputed:
        assert "computed once before training" in err and summary["dpo_reference_s"] > 0
    else:  # the reference is the model with its adapter off: measured by reward_accuracy
        assert "reward_accuracy" in tuned


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_the_reference_holds_no_second_copy_of_the_weights(
    tiny_model_dir, tmp_path, capsys, pairs_file, method
):
    dpo, _ = train_cli(
        capsys, _args(tiny_model_dir, tmp_path / "dpo", pairs_file, f"adapter.method={method}")
    )
    sft, _ = train_cli(
        capsys,
        [
            "train",
            *tiny_run_args(
                tiny_model_dir,
                tmp_path / "sft",
                f"adapter.method={method}",
                "train.max_steps=1",
                "eval.compare_base=false",
                "eval.metric=null",
            ),
        ],
    )
    assert dpo["exact_memory"]["params_bytes"] == sft["exact_memory"]["params_bytes"]


def test_a_killed_dpo_run_resumes_to_the_uninterrupted_one(
    tiny_model_dir, tmp_path, capsys, pairs_file
):
    extra = ("train.max_steps=6", "train.save_every=1", "train.resume=true")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train_cli(capsys, _args(tiny_model_dir, ref, pairs_file, *extra))
    killed_run(_args(tiny_model_dir, cut, pairs_file, *extra), "after-step:4")
    _, err = train_cli(capsys, _args(tiny_model_dir, cut, pairs_file, *extra))
    assert "resumed from" in err
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (ref, cut))
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert [r["loss"] for r in _rows(ref)] == pytest.approx([r["loss"] for r in _rows(cut)])


def test_full_fine_tuning_resumes_with_its_stored_reference(
    tiny_model_dir, tmp_path, capsys, pairs_file
):
    """The reference log-probabilities come from the initial weights: a resumed run reads
    them back instead of recomputing them from trained weights."""
    extra = ("adapter.method=full", "train.max_steps=4", "train.save_every=1", "train.resume=true")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train_cli(capsys, _args(tiny_model_dir, ref, pairs_file, *extra))
    killed_run(_args(tiny_model_dir, cut, pairs_file, *extra), "after-step:2")
    train_cli(capsys, _args(tiny_model_dir, cut, pairs_file, *extra))
    assert [r["loss"] for r in _rows(ref)] == pytest.approx([r["loss"] for r in _rows(cut)])
    assert load_file(str(ref / REFERENCE_FILE))["logps"].equal(
        load_file(str(cut / REFERENCE_FILE))["logps"]
    )


def test_eval_scores_held_out_pairs(tiny_model_dir, tmp_path, capsys, pairs_file):
    out = tmp_path / "run"
    train_cli(capsys, _args(tiny_model_dir, out, pairs_file))
    held = tmp_path / "held.jsonl"
    held.write_text(
        "".join(json.dumps(r) + "\n" for r in get_task("arithmetic-pref").rows("test")[:10])
    )
    preds = tmp_path / "preds.jsonl"
    code = main(["eval", str(out / "adapter"), "--data", str(held), "--predictions", str(preds)])
    stdout, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    figures = json.loads(stdout.strip().splitlines()[-1])
    for key in ("pref_accuracy", "pref_margin", "reward_accuracy", "reward_margin"):
        assert key in figures, figures
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 10
    assert all({"logp_chosen", "logp_rejected", "reward_margin"} <= set(x) for x in lines)
    share = sum(x["logp_chosen"] > x["logp_rejected"] for x in lines) / 10
    assert figures["pref_accuracy"] == pytest.approx(share)


@pytest.mark.slow  # two gloo processes and a reference run
def test_two_processes_follow_one_process(tiny_model_dir, tmp_path, capsys, pairs_file):
    """DDP: 2 processes x 2 pairs against 1 process x 4 pairs, the same loss curve and DPO
    metrics (the loss is the mean over the global batch's pairs)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_cli(capsys, _args(tiny_model_dir, one, pairs_file, "train.batch_size=4"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    r = subprocess.run(
        [
            *ddp_launch(2),
            "lorakit",
            *_args(tiny_model_dir, two, pairs_file, "train.batch_size=2"),
        ],
        cwd=REPO,
        env=dict(env, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", *METRICS):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, x, y)
