"""Packing in training runs (docs/packing.md), on spread-length chat rows (the chat-lengths
task) and the tiny model, in fp32: ``auto`` trains exactly as unpacked (the same rows per
step: loss curve and adapter within 1e-5), ``true`` writes pad_fraction and
real_tokens_per_s and splits its batches into accumulation steps without changing the loss,
a killed packed run resumes to the uninterrupted one, and group_by_length pads less."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import killed_run, task_rows_file, tiny_run_args, train_cli

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """80 chat rows whose lengths spread as instruction data's (median ~150 tokens)."""
    return task_rows_file(tmp_path_factory.mktemp("chat"), "chat-lengths", 80)


def _args(model_dir, out, data: Path, *extra) -> list[str]:
    return [
        "train",
        *tiny_run_args(
            model_dir,
            out,
            f"data.train={data}",
            "data.max_seq_len=384",
            "eval.compare_base=false",
            "eval.metric=null",
            "train.save_every=0",
            *extra,
        ),
    ]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same_adapter(a: Path, b: Path, tol: float) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert (ta[k] - tb[k]).abs().max() <= tol, k


def test_auto_trains_the_same_rows_as_unpacked_with_less_padding(
    tiny_model_dir, tmp_path, capsys, chat_file
):
    auto, padded = tmp_path / "auto", tmp_path / "padded"
    sa, err = train_cli(capsys, _args(tiny_model_dir, auto, chat_file))
    sp, _ = train_cli(capsys, _args(tiny_model_dir, padded, chat_file, "data.packing=false"))
    assert "packing auto -> packed" in err
    assert sa["packing"]["mode"] == "packed" and sa["packing"]["per_batch"]
    assert sp["packing"]["mode"] == "padded"
    assert sa["total_steps"] == sp["total_steps"]
    la, lp = sa["loss_curve"], sp["loss_curve"]
    assert max(abs(x - y) / abs(y) for x, y in zip(la, lp)) <= TOL, (la, lp)
    _same_adapter(auto, padded, TOL)
    assert sa["train_tokens"] == sp["train_tokens"]  # the same rows' tokens
    assert sp["pad_fraction"] > 0.3 and sa["pad_fraction"] < 0.7 * sp["pad_fraction"]


def test_packing_on_writes_pad_fraction_and_real_tokens(
    tiny_model_dir, tmp_path, capsys, chat_file
):
    out = tmp_path / "on"
    summary, err = train_cli(capsys, _args(tiny_model_dir, out, chat_file, "data.packing=on"))
    pk = summary["packing"]
    assert pk["mode"] == "packed" and not pk["per_batch"] and pk["asked"] == "true"
    assert pk["sequences"] < pk["rows"] and pk["fill"] > 0.9
    assert "packing true -> packed" in err
    assert 0 <= summary["pad_fraction"] < 0.1
    assert summary["real_tokens_per_s"] > 0
    rows = [r for r in _metrics(out) if r.get("phase") == "train"]
    assert rows and all(0 <= r["pad_fraction"] < 1 and r["real_tokens_per_s"] > 0 for r in rows)


def test_packed_batches_split_into_accumulation_steps_keep_the_loss(
    tiny_model_dir, tmp_path, capsys, chat_file
):
    """The loss is normalized by the global count of trained tokens: 4 packed sequences in
    one micro-batch or in two of 2 give the same step."""
    one, two = tmp_path / "one", tmp_path / "two"
    s1, _ = train_cli(capsys, _args(tiny_model_dir, one, chat_file, "data.packing=true"))
    s2, _ = train_cli(
        capsys,
        _args(
            tiny_model_dir,
            two,
            chat_file,
            "data.packing=true",
            "train.batch_size=2",
            "train.grad_accum=2",
        ),
    )
    a, b = s1["loss_curve"], s2["loss_curve"]
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= TOL, (a, b)
    _same_adapter(one, two, TOL)


def test_group_by_length_pads_less(tiny_model_dir, tmp_path, capsys, chat_file):
    common = ("data.packing=false", "train.batch_size=2", "train.max_steps=12")
    plain, _ = train_cli(capsys, _args(tiny_model_dir, tmp_path / "plain", chat_file, *common))
    grouped, _ = train_cli(
        capsys,
        _args(tiny_model_dir, tmp_path / "g", chat_file, *common, "data.group_by_length=true"),
    )
    assert grouped["pad_fraction"] < 0.5 * plain["pad_fraction"]


def test_a_killed_packed_run_resumes_to_the_uninterrupted_one(
    tiny_model_dir, tmp_path, capsys, chat_file
):
    extra = ("data.packing=true", "train.save_every=1", "train.resume=true", "adapter.dropout=0.1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train_cli(capsys, _args(tiny_model_dir, ref, chat_file, *extra))
    killed_run(_args(tiny_model_dir, cut, chat_file, *extra), "after-step:4")
    assert not (cut / "summary.json").exists()
    _, err = train_cli(capsys, _args(tiny_model_dir, cut, chat_file, *extra))
    assert "resumed from" in err
    _same_adapter(ref, cut, 1e-6)
