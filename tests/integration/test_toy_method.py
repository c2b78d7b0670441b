"""The method boundary holds for a method unlike LoRA: the VeRA-like toy (tests/toy_vera.py,
one file) has its own PEFT config fields, its own scaling and two tensors shared by every
layer, made by its after-apply hook and saved once at model level. It is added by one
registry row, through ``registry.register``; trained, saved and reloaded with identical
logits, and its files are PEFT's VeRA files: PEFT loads ours and lorakit loads PEFT's."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit import registry
from lorakit.adapters.base import layers_of
from lorakit.cli import main
from lorakit.errors import LorakitError
from tests.conftest import batch, tiny_model, tiny_run_args, train_steps

TARGETS = ["q_proj", "v_proj", "up_proj"]  # three shapes: (32, 32), (16, 32), (64, 32)


@pytest.fixture
def vera():
    registry.register("toy-vera", "tests.toy_vera")  # the one row
    yield importlib.import_module("tests.toy_vera")
    registry.unregister("toy-vera")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch()).logits


def _peft_logits(path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(tiny_model(), str(path)))


@pytest.mark.filterwarnings("ignore:Specified to not:UserWarning")  # PEFT, save_projection
def test_toy_vera_trains_saves_reloads_and_is_peft_vera(vera, tmp_path):
    model = lk.apply(
        tiny_model(),
        method="toy-vera",
        r=8,
        target_modules=TARGETS,
        toy_vera={"projection_prng_key": 7, "d_initial": 0.2},
    )
    layers = layers_of(model, vera.VeRALinear)
    assert len(layers) == 6
    first = next(iter(layers.values()))
    assert all(m.vera_A is first.vera_A and m.vera_B is first.vera_B for m in layers.values())
    assert tuple(first.vera_A.shape) == (8, 32) and tuple(first.vera_B.shape) == (64, 8)
    assert {m.scaling for m in layers.values()} == {1.0}  # the method's rule, not alpha / r
    trainable, _ = lk.count_parameters(model)
    assert trainable == sum(m.out_features + 8 for m in layers.values())
    a0 = first.vera_A.detach().clone()

    train_steps(model)
    assert torch.equal(first.vera_A, a0)  # frozen
    assert all(m.vera_lambda_b.abs().max() > 0 for m in layers.values())  # b left its zeros
    trained = _logits(model)
    assert (trained - _logits(tiny_model())).abs().max() > 1e-4

    lk.save_adapter(model, tmp_path / "ad")
    pc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert pc["peft_type"] == "VERA" and pc["r"] == 8
    assert (
        pc["projection_prng_key"],
        pc["d_initial"],
        pc["save_projection"],
        pc["vera_dropout"],
    ) == (7, 0.2, True, 0.0)
    assert not [k for k in pc if k.startswith("lora_")]  # LoRA's schema is LoRA's
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(k for k in saved if not k.startswith("base_model.model.")) == [
        "base_model.vera_A",
        "base_model.vera_B",
    ]  # once, at model level
    assert len([k for k in saved if k.endswith((".vera_lambda_b", ".vera_lambda_d"))]) == 12
    assert torch.equal(saved["base_model.vera_A"], a0)

    reloaded = lk.load_adapter(tiny_model(), tmp_path / "ad")
    assert torch.equal(_logits(reloaded), trained)
    assert torch.allclose(_peft_logits(tmp_path / "ad"), trained, atol=1e-6)

    # without the projections in the file, loading draws them again from the key (as PEFT)
    lk.save_adapter(model, tmp_path / "small")
    record = json.loads((tmp_path / "small" / "lorakit.json").read_text())
    record["adapter_config"]["toy_vera"]["save_projection"] = False
    (tmp_path / "small" / "lorakit.json").write_text(json.dumps(record))
    (tmp_path / "small" / "adapter_config.json").write_text(
        json.dumps({**pc, "save_projection": False})
    )
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in saved.items() if k.startswith("base_model.model.")},
        str(tmp_path / "small" / "adapter_model.safetensors"),
    )
    assert torch.equal(_logits(lk.load_adapter(tiny_model(), tmp_path / "small")), trained)
    assert torch.allclose(_peft_logits(tmp_path / "small"), trained, atol=1e-6)

    # and the other way: PEFT's own VeRA adapter, read through the method's codec
    from peft import VeraConfig, get_peft_model

    torch.manual_seed(4)
    theirs = get_peft_model(
        tiny_model(), VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=3, d_initial=0.3)
    )
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vera_lambda_b" in n:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(tiny_model(), tmp_path / "peft")
    opts = ours.lorakit_state.config.options
    assert (ours.lorakit_state.config.method, opts.projection_prng_key, opts.d_initial) == (
        "toy-vera",
        3,
        0.3,
    )
    assert torch.allclose(_logits(ours), _logits(theirs), atol=1e-6)


def test_toy_vera_through_the_training_loop(vera, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    "adapter.method=toy-vera",
                    "adapter.r=8",
                    "adapter.toy_vera.d_initial=0.5",
                    "adapter.toy_vera.projection_prng_key=5",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy-vera"
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ds = [v for k, v in saved.items() if k.endswith(".vera_lambda_d")]
    assert ds and all(d.shape == (8,) for d in ds)
    assert any((d - 0.5).abs().max() > 1e-6 for d in ds)  # d trained, from the option's value
    assert summary["trainable_params"] == sum(
        v.numel() for k, v in saved.items() if k.endswith((".vera_lambda_b", ".vera_lambda_d"))
    )

    # the reloaded adapter measures what the trained model measured at the end of the run
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--metric", "none"]) == 0  # the loss alone
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss"] == pytest.approx(summary["tuned"]["valid_loss"], abs=1e-6)

    # an option of the method in a run of another method is refused in one sentence
    assert (
        main(
            [
                "train",
                *tiny_run_args(tiny_model_dir, tmp_path / "bad", "adapter.toy_vera.d_initial=0.5"),
            ]
        )
        == 2
    )
    assert "holds options of method 'toy-vera'" in capsys.readouterr().err


def test_an_error_in_after_apply_undoes_the_apply(vera, monkeypatch):
    def fail(model, cfg):
        raise LorakitError("no room for the projections")

    monkeypatch.setattr(vera.METHOD, "after_apply", fail)
    model = tiny_model()
    model.get_input_embeddings().weight.requires_grad_(False)  # a user's own choice
    modules = [type(m) for m in model.modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with pytest.raises(LorakitError, match="no room"):
        lk.apply(model, method="toy-vera", r=4, target_modules=TARGETS)
    assert [type(m) for m in model.modules()] == modules  # no wrapper left behind
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags  # unfrozen
    assert getattr(model, "lorakit_state", None) is None
    # an error of apply's own, after it froze the model, undoes it too
    with pytest.raises(LorakitError, match="choose one"):
        lk.apply(model, method="lora", r=4, target_modules=["q_proj"], trainable_modules=["q_proj"])
    assert [type(m) for m in model.modules()] == modules
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert getattr(model, "lorakit_state", None) is None
    lk.apply(model, method="lora", r=4)  # and it can be adapted again
