"""lorakit train / eval / generate / merge end to end on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from tests.conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]


def lorakit_proc(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        **kw,
        check=False,
    )


def test_train_writes_everything_and_eval_reads_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_run_args(tiny_model_dir, out)]) == 0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "base" in printed and "tuned" in printed
    for f in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/lorakit.json",
        "summary.json",
        "metrics.jsonl",
        "config.yaml",
    ):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] > 0 and summary["total_steps"] == 6
    assert summary["tuned"]["valid_loss"] < summary["base"]["valid_loss"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))

    assert main(["eval", str(out / "adapter"), "--limit", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss"] > 0 and 0 <= res["exact_match"] <= 1

    # the same run asked for again shows its results (exit 0, nothing trained or written)
    before = (out / "summary.json").read_bytes()
    assert main(["train", *tiny_run_args(tiny_model_dir, out)]) == 0
    captured = capsys.readouterr()
    assert "already holds this finished run" in captured.err and "tuned" in captured.out
    assert (out / "summary.json").read_bytes() == before
    # with other settings it refuses, naming the first that differs (resumed or not)
    for extra in ([], ["train.resume=true"]):
        assert main(["train", *tiny_run_args(tiny_model_dir, out, "adapter.r=8", *extra)]) == 2
        assert "made with another adapter.r" in capsys.readouterr().err


def test_merged_folder_loads_in_plain_transformers(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import lorakit as lk

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    "adapter.target_modules=all-linear",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base, _ = lk.load_model(str(tiny_model_dir))
    model = lk.load_adapter(base, out / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_generate_prints_the_answer_eval_records(tiny_model_dir, tmp_path, capsys):
    """One generation path: for the same adapter and question, ``lorakit generate`` prints
    the answer ``lorakit eval --predictions`` records, with the chat template and, on a base
    whose tokenizer has none, with the ``role: content`` lines training uses."""
    import shutil

    from lorakit.training.tasks import get_task

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(tiny_model_dir, out, "eval.compare_base=false", "train.max_steps=2"),
            ]
        )
        == 0
    )
    plain = tmp_path / "no-template"  # the same model, its tokenizer without a chat template
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    questions = [r["messages"][0]["content"] for r in get_task("arithmetic").rows("test")[:3]]
    for base in (None, plain):
        model_arg = [] if base is None else ["--model", str(base)]
        preds = tmp_path / f"preds-{base is None}.jsonl"
        capsys.readouterr()
        assert (
            main(
                [
                    "eval",
                    str(out),
                    "--data",
                    "task:arithmetic",
                    "--limit",
                    "3",
                    "--max-new-tokens",
                    "6",
                    "--dtype",
                    "fp32",
                    "--predictions",
                    str(preds),
                    *model_arg,
                ]
            )
            == 0
        )
        recorded = [json.loads(x) for x in preds.read_text().splitlines()]
        assert ("<|im_start|>" in recorded[0]["prompt"]) == (base is None)
        by_prompt = {q: r for q in questions for r in recorded if q in r["prompt"]}
        assert len(by_prompt) == 3
        for q in questions:
            capsys.readouterr()
            assert (
                main(["generate", str(out / "adapter"), q, "--max-new-tokens", "6", *model_arg])
                == 0
            )
            assert capsys.readouterr().out == by_prompt[q]["prediction"] + "\n"


def _adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow  # three training processes: ~17 s
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    common = tiny_run_args(
        tiny_model_dir,
        None,
        "train.max_steps=10",
        "train.save_every=2",
        "eval.compare_base=false",
        "eval.metric=null",
        "adapter.dropout=0.1",
        "train.keep_checkpoints=3",
    )
    common = [a for a in common if not a.startswith("output_dir")]
    ref = tmp_path / "ref"
    r = lorakit_proc("train", *common, f"output_dir={ref}")
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", *common, f"output_dir={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-000004").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / "checkpoints" / "step-000004").exists()
    assert not (out / "summary.json").exists()
    r = lorakit_proc("train", *common, f"output_dir={out}", "train.resume=true")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    a, b = _adapter(ref), _adapter(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize(
    "content,needle,code",
    [
        ("", "no usable rows", 2),
        ('{"text": "a"}\n{not json\n', None, 0),  # the bad line is reported, the rest trains
        ('{"foo": 1}\n', "cannot tell the data format", 2),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no usable rows", 2),
    ],
)
def test_bad_data(tiny_model_dir, tmp_path, content, needle, code):
    data = tmp_path / "d.jsonl"
    data.write_text(content * (20 if code == 0 else 1))
    r = lorakit_proc(
        "train",
        *tiny_run_args(
            tiny_model_dir,
            tmp_path / "o",
            f"data.train={data}",
            "eval.compare_base=false",
            "train.max_steps=1",
            "train.batch_size=2",
        ),
    )
    assert r.returncode == code, r.stderr
    if needle:
        assert needle in r.stderr and "Traceback" not in r.stderr
    else:
        assert "skipped" in r.stderr and "line 2" in r.stderr


def test_unknown_file_format_and_bad_override(tiny_model_dir, tmp_path):
    bad = tmp_path / "d.xml"
    bad.write_text("hello")
    r = lorakit_proc("train", *tiny_run_args(tiny_model_dir, tmp_path / "o", f"data.train={bad}"))
    assert r.returncode == 2 and "unknown format" in r.stderr and "Traceback" not in r.stderr
    r = lorakit_proc("train", "train.lr=fast", f"output_dir={tmp_path / 'o2'}")
    assert r.returncode == 2 and "train.lr" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_tensorboard_events_are_written_when_asked(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    "train.max_steps=3",
                    "train.report_to=[tensorboard]",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in logged if "loss" in r], rel=1e-6)
    assert "tuned/valid_loss" in acc.Tags()["scalars"]


def test_a_tracker_that_is_not_installed_is_one_sentence(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    out = tmp_path / "run"
    assert main(["train", *tiny_run_args(tiny_model_dir, out, "train.report_to=[wandb]")]) == 2
    assert "train.report_to: wandb needs the wandb package" in capsys.readouterr().err
    assert not out.exists()


def test_early_stopping_keeps_the_best_weights(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    "train.lr=3.0",
                    "train.max_steps=12",
                    "train.eval_every=1",
                    "train.schedule=constant",
                    "train.warmup_ratio=0",
                    "train.early_stopping_patience=2",
                    "train.keep_best=true",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    evals = [
        (r["step"], r["valid_loss"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "valid_loss" in r
    ]
    best_step, best_loss = min(evals, key=lambda x: x[1])
    assert (s["best_step"], s["best_valid_loss"]) == (best_step, best_loss)
    assert s["stopped_at"] == best_step + 2 == s["steps"] < 12  # two evaluations, no better
    assert len(evals) == s["stopped_at"]
    # the adapter holds the best step's weights: its validation loss is the best one
    assert s["tuned"]["valid_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert "early stopping at step" in capsys.readouterr().err
    assert (
        main(["train", *tiny_run_args(tiny_model_dir, tmp_path / "r2", "train.keep_best=true")])
        == 2
    )
    assert "train.keep_best needs train.eval_every > 0" in capsys.readouterr().err
