"""LongLoRA adapters (docs/methods/longlora.md) load in PEFT 0.21: LoRA on q/k/v/o plus
embeddings and every norm as modules_to_save. Tolerance: fp32 eval-mode logits, 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import lorakit as lk
from tests.conftest import batch, tiny_model, train_steps

TOL = 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _norm_names(model):
    return sorted(n for n, m in model.named_modules() if "norm" in type(m).__name__.lower())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_longlora_adapter_loads_in_peft_with_modules_to_save(arch, tmp_path):
    model = lk.apply(tiny_model(arch), method="longlora")
    assert model.config._attn_implementation == "lorakit_s2_eager"
    trainable = lk.trainable_parameters(model)
    assert any("embed_tokens" in n for n in trainable)
    assert all(
        any(n.startswith(norm + ".") for n in trainable) for norm in _norm_names(tiny_model(arch))
    )
    train_steps(model)  # training mode: S2-Attn (length 12 is grouped as 16, G = 4)
    ids = batch(length=20)
    ours = _logits(model, ids)
    assert not torch.allclose(ours, _logits(tiny_model(arch), ids)), "training changed nothing"
    lk.save_adapter(model, tmp_path / "ad")

    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    assert set(cfg["modules_to_save"]) == {"model.embed_tokens", *_norm_names(tiny_model(arch))}

    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ad").eval()
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= TOL

    back = lk.load_adapter(tiny_model(arch), tmp_path / "ad")
    assert back.config._attn_implementation == "lorakit_s2_eager"
    assert (ours - _logits(back, ids)).abs().max().item() <= TOL


def test_longlora_with_rope_interpolation_round_trip(tmp_path):
    """context_length is re-applied on load; PEFT gets the same logits on a base whose config
    carries the same linear RoPE scaling (PEFT does not change the base's config)."""
    model = lk.apply(tiny_model("llama"), method="longlora", context_length=512)
    assert model.config.rope_parameters == {
        "rope_theta": 10000.0,
        "rope_type": "linear",
        "factor": 2.0,
    }
    train_steps(model)
    ids = batch(length=20)
    ours = _logits(model, ids)
    lk.save_adapter(model, tmp_path / "ad")

    back = lk.load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert back.config.max_position_embeddings == 512
    assert (ours - _logits(back, ids)).abs().max().item() <= TOL

    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}
    cfg.max_position_embeddings = 512
    cfg._attn_implementation = "eager"
    base = AutoModelForCausalLM.from_config(cfg)
    base.load_state_dict(tiny_model("llama").state_dict())
    peft_model = PeftModel.from_pretrained(base.eval(), tmp_path / "ad").eval()
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= TOL
