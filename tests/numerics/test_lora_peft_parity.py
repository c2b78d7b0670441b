"""LoRA parity with PEFT 0.21 on identical weights (PEFT_FORMAT.md). Tolerance: fp32, 1e-5."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lorakit as lk
from lorakit.inject import adapter_layers
from tests.conftest import batch, tiny_model, train_steps

TOL = 1e-5

CASES = [
    ("llama", "all-linear", {}),
    ("llama", ["q_proj", "v_proj", "embed_tokens"], {}),
    ("llama", r".*\.mlp\.(up|down)_proj", {"use_rslora": True}),
    (
        "llama",
        ["q_proj", "k_proj", "o_proj"],
        {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"o_proj": 3.0}},
    ),
    ("qwen2", "all-linear", {}),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], {}),
    ("llama", ["q_proj", "v_proj"], {"trainable_modules": ["model.norm", "input_layernorm"]}),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch,targets,opts", CASES)
def test_lorakit_adapter_loads_in_peft(arch, targets, opts, tmp_path):
    model = lk.apply(tiny_model(arch), method="lora", r=4, alpha=8, target_modules=targets, **opts)
    train_steps(model)
    ids = batch()
    ours = _logits(model, ids)
    assert not torch.allclose(ours, _logits(tiny_model(arch), ids)), "training changed nothing"
    lk.save_adapter(model, tmp_path / "ad")

    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ad").eval()
    theirs = _logits(peft_model, ids)
    assert (ours - theirs).abs().max().item() <= TOL


def _peft_opts(opts):
    out = {k: v for k, v in opts.items() if k != "trainable_modules"}
    if "trainable_modules" in opts:
        out["modules_to_save"] = opts["trainable_modules"]
    return out


@pytest.mark.parametrize("arch,targets,opts", CASES)
def test_peft_adapter_loads_in_lorakit(arch, targets, opts, tmp_path):
    torch.manual_seed(3)
    pcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **_peft_opts(opts),
    )
    peft_model = get_peft_model(tiny_model(arch), pcfg).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ids = batch()
    theirs = _logits(peft_model, ids)

    model = lk.load_adapter(tiny_model(arch), tmp_path / "peft")
    ours = _logits(model, ids)
    assert (ours - theirs).abs().max().item() <= TOL
    with lk.disabled(model):
        assert torch.allclose(_logits(model, ids), _logits(tiny_model(arch), ids), atol=1e-6)


@pytest.mark.parametrize("arch,targets,opts", CASES)
def test_trainable_parameter_count_equals_peft(arch, targets, opts):
    ours = lk.apply(tiny_model(arch), method="lora", r=4, alpha=8, target_modules=targets, **opts)
    pcfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM", **_peft_opts(opts)
    )
    peft_model = get_peft_model(tiny_model(arch), pcfg)
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_ours = sum(p.numel() for p in lk.trainable_parameters(ours).values())
    assert n_ours == n_peft
    assert lk.count_parameters(ours)[0] == n_peft


@pytest.mark.parametrize(
    "arch,targets",
    [
        ("llama", "all-linear"),
        ("gpt2", ["c_attn", "c_fc"]),
        ("llama", ["embed_tokens", "down_proj"]),
    ],
)
def test_merge_unmerge_exact(arch, targets):
    model = train_steps(lk.apply(tiny_model(arch), r=4, alpha=8, target_modules=targets))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = batch()
    unmerged = _logits(model, ids)
    lk.merge(model)
    lk.merge(model)  # idempotent
    merged = _logits(model, ids)
    assert (merged - unmerged).abs().max().item() <= 1e-4
    lk.unmerge(model)
    lk.unmerge(model)
    after = model.state_dict()
    worst = max((before[k] - after[k]).abs().max().item() for k in before)
    assert worst <= 1e-6
    assert (_logits(model, ids) - unmerged).abs().max().item() <= 1e-5


def test_disabled_gives_base_outputs_even_when_merged():
    base = tiny_model("llama")
    model = train_steps(lk.apply(copy.deepcopy(base), r=4, alpha=8))
    ids = batch()
    lk.merge(model)
    with lk.disabled(model):
        assert (_logits(model, ids) - _logits(base, ids)).abs().max().item() <= 1e-5
    assert all(m.merged for _, m in lk.inject.adapter_layers(model))


def test_embedded_smollm2_parity_both_ways(smollm2, tmp_path):
    model, tok = smollm2
    pristine = copy.deepcopy(model)
    ids = tok(
        ["The capital of France is", "LoRA adapters are small"], return_tensors="pt", padding=True
    ).input_ids
    lk.apply(model, r=8, alpha=16, target_modules="all-linear")
    opt = torch.optim.AdamW(lk.trainable_parameters(model).values(), lr=1e-3)
    for _ in range(2):  # a few optimizer steps make B non-zero
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(m.lora_B.abs().max() > 0 for _, m in lk.inject.adapter_layers(model))
    ours = _logits(model, ids)
    lk.save_adapter(model, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "ad").eval()
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= TOL

    peft_model.save_pretrained(tmp_path / "peft")
    back = lk.load_adapter(pristine, tmp_path / "peft")
    assert (ours - _logits(back, ids)).abs().max().item() <= TOL


def test_adapter_on_the_embedded_model_loads_with_auto_peft_offline(smollm2, tmp_path):
    """base_model_name_or_path is the embedded model's local folder, so PEFT's
    AutoPeftModelForCausalLM finds the base without the network (HF_HUB_OFFLINE=1 here)."""
    from peft import AutoPeftModelForCausalLM

    model, _ = smollm2
    model = lk.apply(model, r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_(std=0.02)
    lk.save_adapter(model, tmp_path / "ad")
    theirs = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad").eval()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        diff = (theirs(input_ids=ids).logits - model.eval()(input_ids=ids).logits).abs().max()
    assert diff.item() <= 1e-4
