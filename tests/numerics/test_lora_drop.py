"""LoRA-drop (docs/methods/lora-drop.md): importance against a direct computation, selection,
sharing by Parameter identity (optimizer, steps, save/load), PEFT loads the adapter (fp32,
<= 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import lorakit as lk
from lorakit.adapters import lora_drop as ld
from lorakit.inject import adapter_layers, state_of
from lorakit.training.batching import collate
from lorakit.training.optim import build_optimizer
from tests.conftest import batch, tiny_model, train_steps

TOL = 1e-5


def _examples(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(1, 96, (n,), generator=g).tolist(), "labels": [-100] * n}
        for n in lengths
    ]


def _trained(arch="llama", targets="all-linear", **opts):
    own = {k: opts.pop(k) for k in list(opts) if k in ld.LoRADropOptions.model_fields}
    model = lk.apply(
        tiny_model(arch),
        method="lora-drop",
        r=4,
        alpha=8,
        target_modules=targets,
        lora_drop=own,
        **opts,
    )
    return train_steps(model)


def _dropped(arch="llama", targets="all-linear", threshold=0.6, **opts):
    model = _trained(arch, targets, **opts)
    ex = _examples([5, 12, 8, 3])
    energy = ld.layer_output_energy(model, [collate(ex, 0)])
    record = ld.drop_layers(model, ld.normalize(energy), threshold=threshold)
    return model, record


def _direct_energy(model, examples):
    """Σ over every token of every example, one unpadded example at a time, of ||s·B A x||²
    with x caught at the wrapped base layer's input."""
    layers = dict(adapter_layers(model))
    seen = {n: [] for n in layers}
    hooks = [
        layer.base_layer.register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(args[0].detach())
        )
        for n, layer in layers.items()
    ]
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([e["input_ids"]]))
    for h in hooks:
        h.remove()
    out = {}
    for n, layer in layers.items():
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        out[n] = sum(
            float(((x.double() @ a.T @ b.T) * layer.scaling).pow(2).sum()) for x in seen[n]
        )
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_importance_equals_direct_computation_without_padding(arch):
    model = _trained(
        arch, "all-linear" if arch == "llama" else ["c_attn", "c_proj", "c_fc"], dropout=0.3
    )
    model.train()  # the energy pass must switch to eval (no dropout) and switch back
    ex = _examples([5, 12, 8, 3])
    b = collate(ex, pad_id=0)
    assert (b["attention_mask"] == 0).any()
    got = ld.layer_output_energy(model, [b])
    assert model.training
    model.eval()
    want = _direct_energy(model, ex)
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-5, abs=1e-9), n
    # padding positions do carry LoRA output: counting them would change the numbers
    b_all = dict(b, attention_mask=torch.ones_like(b["attention_mask"]))
    with_pad = ld.layer_output_energy(model, [b_all])
    assert any(with_pad[n] > want[n] * (1 + 1e-3) for n in want)
    imp = ld.normalize(got)
    assert sum(imp.values()) == pytest.approx(1.0)


def test_importance_of_an_embedding_lora():
    model = _trained("llama", ["embed_tokens", "q_proj"])
    ex = _examples([7, 4])
    got = ld.layer_output_energy(model, [collate(ex, 0)])
    emb = model.get_submodule("model.embed_tokens")
    want = 0.0
    for e in ex:
        ids = torch.tensor(e["input_ids"])
        delta = emb.lora_embedding_A.T[ids] @ emb.lora_embedding_B.T * emb.scaling
        want += float(delta.double().pow(2).sum())
    assert got["model.embed_tokens"] == pytest.approx(want, rel=1e-5)


def test_threshold_and_top_n_selection():
    imp = {"a": 0.05, "b": 0.4, "c": 0.3, "d": 0.15, "e": 0.1}
    assert ld.select_layers(imp, 0.9) == ["b", "c", "d", "e"]  # 0.4+0.3+0.15 = 0.85 < 0.9
    assert ld.select_layers(imp, 0.85) == ["b", "c", "d"]  # reached exactly
    assert ld.select_layers(imp, 0.4) == ["b"]
    assert ld.select_layers(imp, 1.0) == ["b", "c", "d", "e", "a"]
    assert ld.select_layers(imp, 0.9, top_n=2) == ["b", "c"]
    assert ld.select_layers(imp, 0.9, top_n=10) == ["b", "c", "d", "e", "a"]
    with pytest.raises(lk.LorakitError, match="zero"):
        ld.normalize({"a": 0.0, "b": 0.0})


def test_dropped_layers_share_one_parameter_pair():
    model, rec = _dropped(threshold=0.6)
    layers = dict(adapter_layers(model))
    assert rec["shared"] and rec["kept"]
    for key, names in rec["shared"].items():
        assert all(n.endswith("." + key) for n in names)
        first = layers[names[0]]
        for n in names[1:]:
            assert layers[n].lora_A is first.lora_A and layers[n].lora_B is first.lora_B
    # kept layers own their pair; every dropped layer is in exactly one group
    kept_ids = {id(layers[n].lora_A) for n in rec["kept"]}
    assert len(kept_ids) == len(rec["kept"])
    shared_names = [n for g in rec["shared"].values() for n in g]
    assert sorted(shared_names + rec["kept"]) == sorted(layers)
    # fresh adapters for the main training: B = 0 everywhere, so the model is the base model
    assert all(float(m.lora_B.abs().max()) == 0 for m in layers.values())
    # counts: trainable parameters = kept pairs + one pair per group, below plain LoRA's
    trainable = sum(p.numel() for p in lk.trainable_parameters(model).values())
    assert trainable == rec["adapter_params"] == lk.count_parameters(model)[0]
    assert trainable < rec["lora_adapter_params"]
    plain = lk.apply(tiny_model("llama"), method="lora", r=4, alpha=8)
    assert rec["lora_adapter_params"] == lk.count_parameters(plain)[0]
    assert state_of(model).extras["lora_drop"] is rec


def test_top_n_keeps_exactly_n_and_carry_over_keeps_weights():
    model = _trained()
    before = {
        n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in adapter_layers(model)
    }
    energy = ld.layer_output_energy(model, [collate(_examples([6, 9]), 0)])
    rec = ld.drop_layers(model, ld.normalize(energy), top_n=3, carry_over=True)
    assert len(rec["kept"]) == 3
    layers = dict(adapter_layers(model))
    for n in rec["kept"]:
        assert torch.equal(layers[n].lora_A, before[n][0])
        assert torch.equal(layers[n].lora_B, before[n][1])
    for names in rec["shared"].values():  # the shared pair starts fresh (module docstring)
        assert float(layers[names[0]].lora_B.abs().max()) == 0


def test_optimizer_sees_each_shared_parameter_once_and_steps_keep_them_equal():
    model, rec = _dropped()
    opt = build_optimizer(model, lr=1e-2)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(lk.trainable_parameters(model))
    layers = dict(adapter_layers(model))
    names = max(rec["shared"].values(), key=len)
    assert len(names) >= 2
    shared_a = layers[names[0]].lora_A
    assert sum(i == id(shared_a) for i in ids) == 1
    start = shared_a.detach().clone()
    model.train()
    for i in range(2):
        x = batch(seed=10 + i)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(shared_a, start)
    saved = {n: layers[n].peft_state() for n in names}
    for n in names[1:]:
        for k in saved[n]:
            assert torch.equal(saved[n][k], saved[names[0]][k])


def test_shared_gradient_is_the_sum_over_its_layers():
    model, rec = _dropped()
    layers = dict(adapter_layers(model))
    names = max(rec["shared"].values(), key=len)
    for m in layers.values():  # a non-zero B so that A gets a gradient too
        with torch.no_grad():
            m.lora_B.normal_(0, 0.1)
    x = batch(seed=3)
    model(input_ids=x, labels=x).loss.backward()
    shared = layers[names[0]].lora_A
    grad_shared = shared.grad.clone()
    # the same model with the layers untied: sum of the per-layer gradients
    untied = {}
    for n in names:
        layers[n].lora_A = torch.nn.Parameter(shared.detach().clone())
        untied[n] = layers[n].lora_A
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    total = sum(untied[n].grad for n in names)
    assert torch.allclose(grad_shared, total, atol=1e-6)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "arch,targets", [("llama", "all-linear"), ("qwen2", ["q_proj", "v_proj", "embed_tokens"])]
)
def test_sharing_survives_save_and_load_and_peft_loads_it(arch, targets, tmp_path):
    model, rec = _dropped(arch, targets, threshold=0.5)
    train_steps(model, seed=7)
    ids = batch()
    ours = _logits(model, ids)
    assert not torch.allclose(ours, _logits(tiny_model(arch), ids))
    lk.save_adapter(model, tmp_path / "ad")
    extras = json.loads((tmp_path / "ad" / "lorakit.json").read_text())["extras"]
    assert extras["lora_drop"]["shared"] == rec["shared"]

    loaded = lk.load_adapter(tiny_model(arch), tmp_path / "ad")
    layers = dict(adapter_layers(loaded))
    for names in rec["shared"].values():
        for n in names[1:]:
            assert layers[n].lora_A is layers[names[0]].lora_A
            assert layers[n].lora_B is layers[names[0]].lora_B
    assert lk.count_parameters(loaded)[0] == lk.count_parameters(model)[0]
    assert (_logits(loaded, ids) - ours).abs().max().item() <= TOL
    assert state_of(loaded).extras["lora_drop"]["kept"] == rec["kept"]

    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ad").eval()
    assert (_logits(peft_model, ids) - ours).abs().max().item() <= TOL


def test_loading_untied_copies_of_a_shared_pair_refuses(tmp_path):
    from safetensors.torch import load_file, save_file

    model, rec = _dropped()
    train_steps(model, seed=7)
    lk.save_adapter(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    t = load_file(str(f))
    names = max(rec["shared"].values(), key=len)
    t[f"base_model.model.{names[1]}.lora_B.weight"] += 1.0
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(lk.LorakitError, match="method='lora'"):
        lk.load_adapter(tiny_model("llama"), tmp_path / "ad")
    # as plain LoRA the differing copies load as they are
    plain = lk.load_adapter(tiny_model("llama"), tmp_path / "ad", method="lora")
    layers = dict(adapter_layers(plain))
    assert layers[names[1]].lora_B is not layers[names[0]].lora_B


def test_per_module_type_selection():
    imp = {
        "l0.q_proj": 0.01,
        "l1.q_proj": 0.03,
        "l2.q_proj": 0.01,
        "l0.down_proj": 0.8,
        "l1.down_proj": 0.1,
        "l2.down_proj": 0.05,
    }
    assert ld.select_layers(imp, 0.9) == ["l0.down_proj", "l1.down_proj"]
    # within q_proj: 0.6, 0.2, 0.2 -> 0.6 + 0.2 reaches 0.8; within down_proj: 0.84 alone
    assert ld.select_per_type(imp, 0.8) == ["l0.down_proj", "l1.q_proj", "l0.q_proj"]
    assert ld.select_per_type(imp, 0.9, top_n=1) == ["l0.down_proj", "l1.q_proj"]
    model, rec = _dropped(threshold=0.5, importance_scope="module_type")
    assert rec["scope"] == "module_type"
    kept_types = {n.rsplit(".", 1)[-1] for n in rec["kept"]}
    assert len(kept_types) == 7  # every type keeps at least its most important layer
