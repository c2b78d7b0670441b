"""Evaluation figures do not move with ``eval.batch_size``: in a bf16 run, the predictions
with batch size 1 and 8 are identical (eval.precision: fp32, the default), and evaluating
leaves the bf16 weights as they were."""

from __future__ import annotations

import json

import torch

import lorakit as lk
from lorakit.config import EvalConfig
from lorakit.training.data import read_rows
from lorakit.training.evaluation import HeldOut, measure
from lorakit.training.runtime import cast_frozen


def _bf16_model(model_dir):
    model, tok = lk.load_model(str(model_dir))
    lk.apply(model, method="lora", r=4, alpha=8)
    torch.manual_seed(0)
    for _, layer in lk.inject.adapter_layers(model):  # an adapter that changes the answers
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    cast_frozen(model, torch.bfloat16)  # as a bf16 training run stores its frozen weights
    return model, tok


def test_predictions_with_batch_size_1_and_8_are_identical(tiny_model_dir, tmp_path):
    model, tok = _bf16_model(tiny_model_dir)
    rows = read_rows("task:arithmetic", "test").rows[:24]
    heldout = HeldOut([], rows, "chat")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    preds = {}
    for bs in (1, 8):
        ec = EvalConfig(batch_size=bs, limit=24, max_new_tokens=12)
        out = measure(
            model,
            tok,
            heldout,
            ec,
            256,
            torch.bfloat16,
            f"b{bs}",
            lambda s: None,
            tmp_path / f"b{bs}.jsonl",
        )
        lines = (tmp_path / f"b{bs}.jsonl").read_text().splitlines()
        preds[bs] = [json.loads(ln)["prediction"] for ln in lines]
        assert out["generation"]["examples"] == 24
    assert len(preds[1]) == 24 and any(preds[1])  # the tiny model answers something
    assert preds[1] == preds[8]
    for n, p in model.named_parameters():  # upcast for evaluation, then exactly back
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n
