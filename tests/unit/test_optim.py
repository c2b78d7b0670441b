"""Optimizer groups: plain AdamW groups, LoRA+ (docs/methods/lora-plus.md) against PEFT's
``create_loraplus_optimizer`` on the same model, and the schedule."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn

import lorakit as lk
from lorakit.training.optim import build_optimizer, build_scheduler, parameter_groups
from tests.conftest import tiny_model

LR, RATIO, WD, LR_EMB = 1e-3, 16.0, 0.01, 1e-6


def _peft_key(name: str) -> str:
    """PEFT parameter name -> lorakit's (no adapter name, no ``.weight`` on adapter tensors)."""
    name = name.replace("base_model.model.", "", 1).replace("modules_to_save.default", "module")
    name = name.replace(".default", "")
    for t in ("lora_A", "lora_B", "lora_magnitude_vector"):
        name = name.replace(f"{t}.weight", t)
    return name


def _settings(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, tuple]:
    return {
        names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
    }


CASES = [  # (arch, lorakit options, PEFT options)
    ("llama", {"target_modules": "all-linear"}, {"target_modules": "all-linear"}),
    (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    ),
    (
        "qwen2",
        {"method": "dora", "target_modules": ["q_proj", "down_proj"]},
        {"use_dora": True, "target_modules": ["q_proj", "down_proj"]},
    ),
    (
        "gpt2",
        {"target_modules": ["c_attn"], "trainable_modules": ["ln_f"]},
        {"target_modules": ["c_attn"], "modules_to_save": ["ln_f"]},
    ),
]


@pytest.mark.parametrize("arch,ours_opts,peft_opts", CASES)
def test_loraplus_groups_equal_peft(arch, ours_opts, peft_opts):
    ours = lk.apply(
        tiny_model(arch),
        **{"r": 4, "alpha": 8, **ours_opts},
        loraplus_ratio=RATIO,
        loraplus_lr_embedding=LR_EMB,
    )
    opt = build_optimizer(ours, LR, weight_decay=WD)
    mine = _settings(opt, {id(p): n for n, p in lk.trainable_parameters(ours).items()})

    peft_model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, **peft_opts))
    popt = create_loraplus_optimizer(
        peft_model,
        torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_weight_decay=WD,
        loraplus_lr_embedding=LR_EMB,
    )
    theirs = _settings(popt, {id(p): _peft_key(n) for n, p in peft_model.named_parameters()})
    assert mine == theirs
    assert len({lr for lr, _ in mine.values()}) >= 2


def test_roles_come_from_the_layer_not_the_name():
    """PEFT#3499-style trap: a module whose name contains "lora_B" keeps its A in group A."""
    model = nn.Sequential()
    model.add_module("lora_Bridge", nn.Linear(8, 8))
    model.add_module("out", nn.Linear(8, 8))
    lk.apply(model, r=2, alpha=4, target_modules=["lora_Bridge"], loraplus_ratio=RATIO)
    groups = {g["name"]: g for g in parameter_groups(model, LR, WD)}
    layer = model.lora_Bridge
    assert any(p is layer.lora_A for p in groups["A"]["params"])
    assert any(p is layer.lora_B for p in groups["B"]["params"])
    assert groups["B"]["lr"] == RATIO * LR and groups["A"]["lr"] == LR


def test_norms_and_biases_get_no_weight_decay():
    """lorakit exempts every normalization layer (here Llama's RMSNorm), as transformers'
    Trainer does; PEFT's LoRA+ exempts only nn.LayerNorm (the one documented difference)."""
    model = lk.apply(
        tiny_model("llama"),
        r=4,
        alpha=8,
        target_modules=["q_proj"],
        trainable_modules=["norms"],
        loraplus_ratio=RATIO,
    )
    groups = {g["name"]: g for g in parameter_groups(model, LR, WD)}
    norm_w = model.model.norm.module.weight
    assert any(p is norm_w for p in groups["B_no_decay"]["params"])
    assert groups["B_no_decay"]["weight_decay"] == 0.0 and groups["B"]["weight_decay"] == WD


@pytest.mark.parametrize("method", ["lora", "dora", "lora-fa", "full"])
def test_every_trainable_parameter_exactly_once(method):
    model = lk.apply(tiny_model("llama"), method=method, r=4, alpha=8, loraplus_ratio=4.0)
    groups = parameter_groups(model, LR, WD)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in lk.trainable_parameters(model).values()}
    if method == "lora-fa":  # A frozen: nothing at the A learning rate
        assert {g["name"] for g in groups} == {"B"}
    if method == "full":
        names = {g["name"] for g in groups}
        assert {"A", "B_no_decay"} <= names


def test_without_loraplus_one_lr_and_vectors_undecayed():
    model = lk.apply(tiny_model("llama"), method="dora", r=4, alpha=8)
    groups = parameter_groups(model, LR, WD)
    assert {g["lr"] for g in groups} == {LR}
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].ndim < 2)


def test_scheduler_keeps_the_loraplus_ratio():
    model = lk.apply(tiny_model("llama"), r=4, alpha=8, loraplus_ratio=RATIO)
    opt = build_optimizer(model, LR, WD)
    sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["B"] == pytest.approx(RATIO * lrs["A"])


def test_the_fused_adamw_kernel_makes_the_same_update_as_the_loop():
    ref = lk.apply(tiny_model(), r=4, alpha=8)
    fused = lk.apply(tiny_model(), r=4, alpha=8)
    opt = build_optimizer(fused, LR, WD)
    assert opt.defaults["fused"] is True
    loop = torch.optim.AdamW(
        list(lk.trainable_parameters(ref).values()), lr=LR, weight_decay=WD, foreach=False
    )
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, o in ((ref, loop), (fused, opt)):
            model(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for (n, a), b in zip(
        lk.trainable_parameters(ref).items(), lk.trainable_parameters(fused).values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
