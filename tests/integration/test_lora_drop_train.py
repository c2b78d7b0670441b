"""``lorakit train adapter.method=lora-drop`` end to end on a tiny model: sample phase, the
selection in summary.json and lorakit.json, fewer trainable parameters than LoRA, sharing
restored on load, and an exact resume that reuses the recorded selection."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main
from lorakit.inject import adapter_layers
from tests.conftest import tiny_run_args

ARGS = (
    "adapter.method=lora-drop",
    "adapter.target_modules=all-linear",
    "adapter.lora_drop.threshold=0.7",
    "eval.compare_base=false",
    "train.save_every=2",
    "train.keep_checkpoints=3",
)


def test_lora_drop_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_run_args(tiny_model_dir, out, *ARGS)]) == 0
    printed = capsys.readouterr()
    assert "lora-drop: kept" in printed.out + printed.err

    summary = json.loads((out / "summary.json").read_text())
    rec = summary["method_summary"]
    assert rec["sample_steps"] >= 1 and rec["sample_examples"] >= 4  # >= one step's worth
    assert rec["kept"] and rec["shared"] and rec["kept_importance"] >= 0.7
    assert sum(rec["importance"].values()) == pytest.approx(1.0)
    assert summary["trainable_params"] == rec["adapter_params"] < rec["lora_adapter_params"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("phase") == "lora-drop sample"] == list(
        range(1, rec["sample_steps"] + 1)
    )
    assert [x["step"] for x in lines if x.get("phase") == "train"] == list(range(1, 7))

    # plain LoRA on the same model and targets has more trainable parameters
    base, _ = lk.load_model(str(tiny_model_dir))
    plain = lk.apply(base, method="lora", r=4, target_modules="all-linear")
    assert lk.count_parameters(plain)[0] == rec["lora_adapter_params"]

    saved = json.loads((out / "adapter" / "lorakit.json").read_text())
    assert saved["extras"]["lora_drop"]["shared"] == rec["shared"]
    base, _ = lk.load_model(str(tiny_model_dir))
    model = lk.load_adapter(base, out / "adapter")
    layers = dict(adapter_layers(model))
    for names in rec["shared"].values():
        assert all(layers[n].lora_A is layers[names[0]].lora_A for n in names)
    assert lk.count_parameters(model)[0] == rec["adapter_params"]

    # resume from the step-4 checkpoint: the selection is read back, not recomputed, and the
    # final adapter equals the uninterrupted run's
    first = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    (out / "summary.json").unlink()
    assert main(["train", *tiny_run_args(tiny_model_dir, out, *ARGS, "train.resume=true")]) == 0
    printed = capsys.readouterr()
    assert "reusing the layer selection" in printed.out + printed.err
    assert "resumed from" in printed.out + printed.err
    again = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == again.keys()
    assert max((first[k] - again[k]).abs().max().item() for k in first) <= 1e-6
    assert json.loads((out / "summary.json").read_text())["method_summary"]["kept"] == rec["kept"]
