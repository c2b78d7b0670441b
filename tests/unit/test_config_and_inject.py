"""Config validation, target resolution and the errors a user sees."""

from __future__ import annotations

import re

import pytest
import torch

import lorakit as lk
from lorakit.inject import find_targets, name_matches, pattern_value
from lorakit.registry import PRESETS
from tests.conftest import tiny_model


def test_defaults_and_presets():
    c = lk.AdapterConfig()
    assert (c.method, c.r, c.alpha, c.target_modules) == ("lora", 16, 32.0, "all-linear")
    q = lk.AdapterConfig(method="qlora")
    assert (q.method, q.quantize, q.r, q.alpha) == ("lora", "nf4", 64, 16)
    assert lk.AdapterConfig(method="qlora", r=8).r == 8  # the user's value wins
    assert lk.AdapterConfig(method="lora+").loraplus_ratio == 16
    ll = lk.AdapterConfig(method="longlora")
    assert ll.s2_attn and ll.trainable_modules == ["embeddings", "norms"] and ll.r == 8
    assert set(PRESETS) == {"qlora", "lora+", "longlora"}


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"r": 0}, "adapter.r"),
        ({"alpha": -1}, "adapter.alpha"),
        ({"method": "nope"}, "method must be one of"),
        ({"bogus": 1}, "adapter.bogus: unknown key"),
        ({"dropout": 1.5}, "adapter.dropout"),
        ({"target_modules": []}, "target_modules must not be empty"),
        (
            {"method": "adalora", "adalora": {"init_r": 4, "target_r": 8}},
            "target_r must not exceed init_r",
        ),
    ],
)
def test_bad_adapter_config_is_one_sentence(kwargs, needle):
    model = tiny_model()
    with pytest.raises(lk.LorakitError) as e:
        lk.apply(model, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert getattr(model, "lorakit_state", None) is None


def test_target_matching_follows_peft():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.qq_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", r".*\.q_proj")
    assert not name_matches("model.layers.0.self_attn.q_proj", r"q_proj")  # full match
    assert pattern_value({"k_proj": 2}, "model.layers.0.self_attn.k_proj", 8) == 2
    assert pattern_value({"k_proj": 2}, "model.layers.0.self_attn.kk_proj", 8) == 8
    names = find_targets(tiny_model(), "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7


def test_target_matching_nothing_lists_names():
    with pytest.raises(lk.LorakitError) as e:
        lk.apply(tiny_model(), target_modules=["qkv"])
    msg = str(e.value)
    assert "matches no module" in msg and "q_proj" in msg and "down_proj" in msg


def test_target_of_wrong_type():
    with pytest.raises(lk.LorakitError, match="only linear"):
        lk.apply(tiny_model(), target_modules=["self_attn"])


def test_apply_freezes_base_and_trains_adapters():
    model = lk.apply(tiny_model(), r=4, target_modules=["q_proj"], trainable_modules=["norms"])
    names = set(lk.trainable_parameters(model))
    assert all(("lora_" in n) or ("norm" in n) for n in names)
    assert any("lora_A" in n for n in names) and any("norm" in n for n in names)
    with pytest.raises(lk.LorakitError, match="already"):
        lk.apply(model)


def test_full_method_trains_everything():
    model = lk.apply(tiny_model(), method="full")
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_tied_embedding_is_untied_like_peft():
    model = lk.apply(tiny_model(), r=4, target_modules=["q_proj"], trainable_modules=["embeddings"])
    emb = model.get_input_embeddings()
    assert emb.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert emb.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_unload_restores_plain_modules():
    model = lk.apply(tiny_model(), r=4)
    lk.unload(model, merge_adapters=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not hasattr(model, "lorakit_state")


@pytest.mark.parametrize(
    "override, hint",
    [
        ("num_train_epochs=2", "lorakit calls it train.epochs"),
        ("learning_rate=1e-4", "lorakit calls it train.lr"),
        ("lora_rank=8", "lorakit calls it adapter.r"),
        ("train.batchsize=4", "did you mean 'batch_size'?"),
        ("adapter.targt_modules=[q_proj]", "did you mean 'target_modules'?"),
    ],
)
def test_unknown_keys_point_to_lorakits_name(override, hint):
    from lorakit.config import load_run_config

    with pytest.raises(lk.LorakitError, match="unknown key; " + re.escape(hint)):
        load_run_config(None, [override])


def test_assigning_fields_keeps_the_options_right():
    cfg = lk.AdapterConfig(method="adalora", adalora={"target_r": 4})
    cfg.alpha = 8.0
    assert cfg.options.target_r == 4 and cfg.alpha == 8.0
    cfg.method = "lora"  # another method: its options go
    assert cfg.options is None
    cfg.method = "lora-drop"
    assert cfg.options.threshold == 0.9


def test_quant_compute_dtype_auto_is_bf16_only_where_it_is_native(monkeypatch):
    """On a CPU that emulates bf16 a bf16 NF4 step was ~27x the fp32 LoRA step: auto is fp32
    there, bf16 where bf16 is native; an explicit dtype is kept."""
    import torch

    from lorakit import quant
    from lorakit.config import AdapterConfig

    assert AdapterConfig().quant_compute_dtype == "auto"
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(quant, "native_bf16", lambda native=native: native)
        assert quant.compute_dtype_of(AdapterConfig()) == dtype
        assert quant.compute_dtype_of(AdapterConfig(quant_compute_dtype="float16")) == torch.float16
