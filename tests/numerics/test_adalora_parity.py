"""AdaLoRA parity with PEFT 0.21's AdaLoraModel on identical weights (PEFT_FORMAT.md, METHODS §6).

Tolerances: logits and losses in fp32 within 1e-5; the allocator's masks, budgets and the
parameters are compared exactly (both sides see the same gradients and identical AdamW steps).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit as lk
from lorakit.adapters.adalora import AdaLoRAHooks, RankAllocator, adalora_layers
from tests.conftest import batch, tiny_model

TOL = 1e-5
SCHED = {"init_r": 6, "target_r": 3, "tinit": 4, "tfinal": 8, "delta_t": 3}
TOTAL = 30
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_cfg(targets, total=TOTAL, alpha=8, gamma=0.5, **sched):
    s = {**SCHED, **sched}
    return AdaLoraConfig(
        init_r=s["init_r"],
        target_r=s["target_r"],
        tinit=s["tinit"],
        tfinal=s["tfinal"],
        deltaT=s["delta_t"],
        total_step=total,
        lora_alpha=alpha,
        orth_reg_weight=gamma,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def _ours(arch, targets, alpha=8, gamma=0.5, rank_pattern=None, **sched):
    common = {"rank_pattern": rank_pattern} if rank_pattern else {}
    return lk.apply(
        tiny_model(arch),
        method="adalora",
        alpha=alpha,
        target_modules=targets,
        adalora={**SCHED, **sched, "orth_reg_weight": gamma},
        **common,
    )


def _peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def _copy_peft_into_ours(peft_model, ours):
    for name, layer in adalora_layers(ours).items():
        theirs = _peft_layer(peft_model, name)
        with torch.no_grad():
            for p in layer.adapter_param_names:
                getattr(layer, p).copy_(getattr(theirs, p)["default"])


def _pairs(peft_model, ours):
    """(our param, PEFT's param) in a fixed order."""
    return [
        (getattr(layer, p), getattr(_peft_layer(peft_model, n), p)["default"])
        for n, layer in adalora_layers(ours).items()
        for p in layer.adapter_param_names
    ]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_peft(peft_model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize(
    "arch,targets", [("llama", TARGETS), ("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc"])]
)
def test_forward_and_merge_match_peft(arch, targets):
    peft_model = get_peft_model(tiny_model(arch), _peft_cfg(targets)).eval()
    _randomize_peft(peft_model)
    ours = _ours(arch, targets).eval()
    _copy_peft_into_ours(peft_model, ours)
    ids = batch()
    theirs = _logits(peft_model, ids)
    mine = _logits(ours, ids)
    assert not torch.allclose(theirs, _logits(tiny_model(arch), ids)), "adapter is a no-op"
    assert (mine - theirs).abs().max().item() <= TOL
    lk.merge(ours)
    assert (_logits(ours, ids) - theirs).abs().max().item() <= 1e-4
    lk.unmerge(ours)
    assert (_logits(ours, ids) - mine).abs().max().item() <= TOL


def test_init_matches_peft():
    peft_model = get_peft_model(tiny_model("llama"), _peft_cfg(TARGETS))
    ours = _ours("llama", TARGETS)
    ids = batch()
    # E = 0: the adapter starts as a no-op on both sides; A, B ~ N(0, 0.02²)
    assert torch.equal(_logits(ours, ids), _logits(tiny_model("llama"), ids))
    a = torch.cat([m.lora_A.flatten() for m in adalora_layers(ours).values()])
    assert 0.015 < a.std().item() < 0.025 and abs(a.mean().item()) < 0.005
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lk.count_parameters(ours)[0] == n_peft


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train PEFT and lorakit side by side for TOTAL steps, recording what each step did."""
    tmp = tmp_path_factory.mktemp("adalora")
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), _peft_cfg(TARGETS))
    ours = _ours("llama", TARGETS)
    _copy_peft_into_ours(peft_model, ours)
    pairs = _pairs(peft_model, ours)
    opt_o = torch.optim.AdamW([o for o, _ in pairs], lr=2e-2, foreach=False)
    opt_p = torch.optim.AdamW([t for _, t in pairs], lr=2e-2, foreach=False)
    hooks = AdaLoRAHooks()
    rec = {
        "loss": [],
        "reg": [],
        "grad": [],
        "params_equal": [],
        "masks_equal": [],
        "budget": [],
        "kept": [],
        "pattern_equal": [],
    }
    peft_model.train()
    ours.train()
    for step in range(1, TOTAL + 1):
        ids = batch(seed=100 + step)
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        with torch.no_grad():
            plain = peft_model.base_model.model(input_ids=ids, labels=ids).loss
        loss = ours(input_ids=ids, labels=ids).loss
        reg = hooks.regularizer(ours)
        (loss + reg).backward()
        rec["loss"].append(abs((loss + reg).item() - out.loss.item()))
        rec["reg"].append(abs(reg.item() - (out.loss - plain).item()))
        rec["grad"].append(max((o.grad - t.grad).abs().max().item() for o, t in pairs))
        for o, t in pairs:  # the same gradients on both sides: masks must agree exactly
            o.grad.copy_(t.grad)
        opt_p.step()
        opt_o.step()
        peft_model.base_model.update_and_allocate(step)
        hooks.after_optimizer_step(ours, step, TOTAL)
        opt_p.zero_grad()
        opt_o.zero_grad()

        rec["params_equal"].append(all(torch.equal(o, t) for o, t in pairs))
        e_pairs = [(o, t) for (o, t) in pairs if o.shape[1:] == (1,)]
        rec["masks_equal"].append(all(torch.equal(o == 0, t == 0) for o, t in e_pairs))
        rec["budget"].append(
            (
                peft_model.base_model.rankallocator.budget_schedule(step),
                hooks.allocator.budget_schedule(step),
            )
        )
        rec["kept"].append(hooks.summary(ours)["total_rank"])
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern:
            mine = {f"{n}.lora_E": m.rank_pattern() for n, m in adalora_layers(ours).items()}
            theirs = {k.replace(".default", ""): v for k, v in pattern.items()}
            rec["pattern_equal"].append(mine == theirs)
        if step == 13:  # mid-schedule: masked E have regrown since the last masking
            lk.save_adapter(ours, tmp / "mid_ours")
            peft_model.save_pretrained(tmp / "mid_peft")
    ours.eval()
    peft_model.eval()
    lk.save_adapter(ours, tmp / "ours", summary=hooks.summary(ours))
    peft_model.save_pretrained(tmp / "peft")
    return {"peft": peft_model, "ours": ours, "hooks": hooks, "rec": rec, "tmp": tmp}


def test_training_step_matches_peft(trained):
    rec = trained["rec"]
    assert max(rec["loss"]) <= TOL
    assert max(rec["reg"]) <= TOL
    assert max(rec["grad"]) <= 1e-6
    assert all(rec["params_equal"])


def test_allocator_masks_and_budget_match_peft(trained):
    rec = trained["rec"]
    assert all(rec["masks_equal"])
    assert rec["pattern_equal"] and all(rec["pattern_equal"])
    assert all(p == o for p, o in rec["budget"])
    n = len(adalora_layers(trained["ours"]))
    b0, bT = SCHED["init_r"] * n, SCHED["target_r"] * n
    # no masking up to tinit, then a shrinking budget, the target from T - tfinal on
    assert rec["kept"][: SCHED["tinit"]] == [b0] * SCHED["tinit"]
    assert all(a >= b for a, b in zip(rec["kept"], rec["kept"][1:]))
    assert b0 > rec["kept"][SCHED["tinit"] + 1] > bT  # the first masking (step 6)
    assert rec["kept"][TOTAL - SCHED["tfinal"] - 1 :] == [bT] * (SCHED["tfinal"] + 1)
    summary = trained["hooks"].summary(trained["ours"])
    assert summary["total_rank"] == summary["target_total_rank"] == bT
    assert summary["init_total_rank"] == b0
    assert len(set(summary["ranks"].values())) > 1, "the budget did not move between matrices"


def _shapes(path):
    return {
        k: tuple(v.shape) for k, v in load_file(str(path / "adapter_model.safetensors")).items()
    }


@pytest.mark.parametrize("which", ["mid", ""])
def test_saved_files_equal_peft(trained, which):
    tmp = trained["tmp"]
    ours_dir = tmp / (f"{which}_ours" if which else "ours")
    peft_dir = tmp / (f"{which}_peft" if which else "peft")
    mine, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (ours_dir, peft_dir))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    cfg_o, cfg_p = (
        json.loads((d / "adapter_config.json").read_text()) for d in (ours_dir, peft_dir)
    )
    assert cfg_o["peft_type"] == "ADALORA"
    assert cfg_o["rank_pattern"] == cfg_p["rank_pattern"]
    for k in (
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "total_step",
        "lora_alpha",
    ):
        assert cfg_o[k] == cfg_p[k], k


def test_lorakit_adapter_loads_in_peft_and_lorakit(trained):
    ids = batch(seed=7)
    mine = _logits(trained["ours"], ids)
    assert (mine - _logits(trained["peft"], ids)).abs().max().item() <= TOL
    peft_back = PeftModel.from_pretrained(tiny_model("llama"), trained["tmp"] / "ours").eval()
    assert (_logits(peft_back, ids) - mine).abs().max().item() <= TOL
    back = lk.load_adapter(tiny_model("llama"), trained["tmp"] / "ours")
    assert (_logits(back, ids) - mine).abs().max().item() <= TOL
    assert (
        AdaLoRAHooks().summary(back)["ranks"] == trained["hooks"].summary(trained["ours"])["ranks"]
    )
    # pruned layers keep the initial rank as divisor
    assert all(m.ranknum == SCHED["init_r"] for m in adalora_layers(back).values())
    # saved again from a pruned model: the same files
    lk.save_adapter(back, trained["tmp"] / "again")
    assert _shapes(trained["tmp"] / "again") == _shapes(trained["tmp"] / "ours")
    again = PeftModel.from_pretrained(tiny_model("llama"), trained["tmp"] / "again").eval()
    assert (_logits(again, ids) - mine).abs().max().item() <= TOL


def test_peft_adapter_loads_in_lorakit(trained):
    ids = batch(seed=8)
    theirs = _logits(trained["peft"], ids)
    back = lk.load_adapter(tiny_model("llama"), trained["tmp"] / "peft")
    assert back.lorakit_state.config.method == "adalora"
    assert (_logits(back, ids) - theirs).abs().max().item() <= TOL
    with lk.disabled(back):
        assert torch.equal(_logits(back, ids), _logits(tiny_model("llama"), ids))


def test_gpt2_conv1d_save_load_both_ways(tmp_path):
    targets = ["c_attn", "c_fc"]
    peft_model = get_peft_model(tiny_model("gpt2"), _peft_cfg(targets)).eval()
    _randomize_peft(peft_model)
    ids = batch()
    theirs = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(tiny_model("gpt2"), tmp_path / "peft")
    assert (_logits(ours, ids) - theirs).abs().max().item() <= TOL
    lk.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"]
    back = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "ours").eval()
    assert (_logits(back, ids) - theirs).abs().max().item() <= TOL


def _grads(model, seed=0):
    ids = batch(seed=seed)
    model(input_ids=ids, labels=ids).loss.backward()


def test_target_equal_to_init_never_masks():
    # b_T == b0 makes PEFT's kthvalue(k=0) fail; lorakit keeps every triplet
    model = _ours("llama", TARGETS, init_r=4, target_r=4, tinit=0, tfinal=2, delta_t=1)
    hooks = AdaLoRAHooks()
    with torch.no_grad():
        for m in adalora_layers(model).values():
            m.lora_E.fill_(0.1)
    for step in range(1, 11):
        _grads(model, step)
        hooks.after_optimizer_step(model, step, 10)
    assert hooks.summary(model)["total_rank"] == 4 * len(adalora_layers(model))
    assert all(bool((m.lora_E != 0).all()) for m in adalora_layers(model).values())


def test_bad_schedule_and_options_fail_clearly():
    model = _ours("llama", TARGETS, tinit=5, tfinal=5)
    with pytest.raises(lk.LorakitError, match="tinit"):
        AdaLoRAHooks().after_optimizer_step(model, 1, 10)
    with pytest.raises(lk.LorakitError, match="rank_pattern"):
        _ours("llama", TARGETS, rank_pattern={"q_proj": 2})
    with pytest.raises(lk.LorakitError, match="use_rslora"):
        lk.apply(tiny_model("llama"), method="adalora", use_rslora=True)


def test_regularizer_off_and_untrained_save(tmp_path):
    model = _ours("llama", TARGETS, gamma=0.0)
    assert AdaLoRAHooks().regularizer(model) is None
    lk.save_adapter(model, tmp_path / "ad")  # never trained: a valid PEFT config all the same
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["total_step"] > cfg["tinit"] + cfg["tfinal"]
    assert all(v == [True] * SCHED["init_r"] for v in cfg["rank_pattern"].values())
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ad")


def test_checkpoint_resume_continues_the_allocation():
    def run(model, hooks, steps, opt):
        for step in steps:
            _grads(model, step)
            opt.step()
            hooks.after_optimizer_step(model, step, 12)
            opt.zero_grad()

    a = _ours("llama", TARGETS, tinit=1, tfinal=3, delta_t=2)
    opt_a = torch.optim.SGD(lk.trainable_parameters(a).values(), lr=0.5)
    hooks_a = AdaLoRAHooks()
    run(a, hooks_a, range(1, 6), opt_a)
    b = copy.deepcopy(a)
    opt_b = torch.optim.SGD(lk.trainable_parameters(b).values(), lr=0.5)
    saved = {k: v.clone() for k, v in hooks_a.state_tensors(a).items()}
    for m in adalora_layers(b).values():
        m.rank_mask.fill_(True)  # as in a fresh process
    hooks_b = AdaLoRAHooks()
    hooks_b.load_state_tensors(b, saved)
    run(a, hooks_a, range(6, 13), opt_a)
    run(b, hooks_b, range(6, 13), opt_b)
    assert hooks_a.summary(a) == hooks_b.summary(b)
    assert hooks_a.summary(a)["total_rank"] == 3 * len(TARGETS) * 2
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_allocator_schedule_shape():
    model = _ours("llama", TARGETS)
    alloc = RankAllocator(adalora_layers(model), model.lorakit_state.config.options, 100)
    budgets = [alloc.budget_schedule(t)[0] for t in range(1, 101)]
    assert budgets[0] == 36 and budgets[-1] == 18
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    copy.deepcopy(alloc)  # plain state: checkpointable
