"""Merged export for every method: plain transformers loads the folder (no lorakit code, no
lorakit attention function named in its config) and gives the adapted model's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from tests.conftest import train_steps

METHODS = [
    ("lora", {}),
    ("dora", {}),
    ("lora-fa", {}),
    ("adalora", {"adalora": {"init_r": 4, "target_r": 2}}),
    ("longlora", {"context_length": 1024}),
]


@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_merged_folder_loads_in_plain_transformers(method, opts, tiny_model_dir, tmp_path):
    model, tok = lk.load_model(str(tiny_model_dir))
    lk.apply(model, method=method, r=4, alpha=8, **opts)
    train_steps(model, steps=2)
    ids = torch.randint(0, 1000, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lk.save_merged(model, tmp_path / "merged", tok)
    assert "lorakit" not in (tmp_path / "merged" / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
