"""The orthogonal options compose: QLoRA + DoRA + LoRA+ + S2-Attn (+ trainable norms) in one
run from one command, and the adapter it writes loads back (lorakit, and PEFT on the 16-bit
base with its quantization-free logits)."""

from __future__ import annotations

import json

import torch

import lorakit as lk
from lorakit.cli import main
from tests.conftest import tiny_run_args


def test_qlora_dora_loraplus_s2_in_one_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            *tiny_run_args(
                tiny_model_dir,
                out,
                "adapter.method=dora",
                "adapter.quantize=nf4",
                "adapter.loraplus_ratio=16",
                "adapter.s2_attn=true",
                "adapter.trainable_modules=[norms]",
                "data.packing=concat",
                "data.max_seq_len=64",
                "eval.compare_base=false",
                "eval.metric=null",
                "train.max_steps=3",
                "train.gradient_checkpointing=true",
            ),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_train_loss"] > 0 and summary["total_steps"] == 3
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["modules_to_save"]

    # The adapter is an ordinary DoRA adapter over the 16-bit base.
    from peft import PeftModel

    base, _ = lk.load_model(str(tiny_model_dir))
    ours = lk.load_adapter(base, out / "adapter", quantize=None).eval()
    theirs = PeftModel.from_pretrained(
        lk.load_model(str(tiny_model_dir))[0], out / "adapter"
    ).eval()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5
