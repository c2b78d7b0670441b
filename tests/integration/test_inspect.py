"""lorakit inspect on tiny runs: the per-layer figures equal a direct computation from the saved
tensors, the ΔM/ΔD plot is drawn, AdaLoRA's ranks and LoRA-drop's importances are shown."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from tests.conftest import tiny_run_args

FAST = ("eval.compare_base=false", "eval.metric=null")


def _train(model_dir, out, *extra):
    assert main(["train", *tiny_run_args(model_dir, out, *FAST, *extra)]) == 0
    return out / "adapter"


def _base_weights(model_dir) -> dict[str, torch.Tensor]:
    return {
        k[: -len(".weight")]: v.double()
        for k, v in load_file(str(model_dir / "model.safetensors")).items()
    }


def _direct(w0: torch.Tensor, w1: torch.Tensor) -> dict:
    """ΔM, ΔD, ||ΔW|| written out from their definitions (docs/methods/dora.md)."""
    m0, m1 = w0.norm(dim=1), w1.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(w1, w0, dim=1)
    return {
        "delta_m": (m1 - m0).abs().mean().item(),
        "delta_d": (1 - cos).mean().item(),
        "delta_norm": (w1 - w0).norm().item(),
    }


def test_dora_vs_lora_draws_the_magnitude_direction_plot(tiny_model_dir, tmp_path, capsys):
    dora = _train(tiny_model_dir, tmp_path / "dora", "adapter.method=dora")
    lora = _train(tiny_model_dir, tmp_path / "lora", "adapter.method=lora")
    capsys.readouterr()
    out = tmp_path / "inspect"
    assert main(["inspect", str(dora), "--vs", str(lora), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "correlation of dD and dM" in printed and "(dora)" in printed
    for png in ("dm_dd.png", "delta_norm.png", "effective_rank.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "data:image/png;base64," in (out / "inspect.html").read_text()
    dora_res, lora_res = json.loads((out / "inspect.json").read_text())
    base = _base_weights(tiny_model_dir)

    t = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(str(dora / "adapter_model.safetensors")).items()
    }
    s = 32.0 / 4  # alpha / r of tiny_run_args
    assert len(dora_res["layers"]) == 14  # 7 linear layers x 2 blocks (all-linear)
    for rec in dora_res["layers"]:
        n = rec["name"]
        w0 = base[n]
        v = w0 + s * t[f"{n}.lora_B.weight"] @ t[f"{n}.lora_A.weight"]
        m = t[f"{n}.lora_magnitude_vector"]
        w1 = m[:, None] * v / v.norm(dim=1, keepdim=True)
        ref = _direct(w0, w1)
        # ΔM of DoRA is the trained magnitude's change from ||W0||_row
        assert ref["delta_m"] == pytest.approx((m - w0.norm(dim=1)).abs().mean().item(), rel=1e-6)
        for k in ref:
            assert rec[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-9), (n, k)

    t = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(str(lora / "adapter_model.safetensors")).items()
    }
    for rec in lora_res["layers"]:
        n = rec["name"]
        dw = s * t[f"{n}.lora_B.weight"] @ t[f"{n}.lora_A.weight"]
        ref = _direct(base[n], base[n] + dw)
        for k in ref:
            assert rec[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-9), (n, k)
        sv = torch.linalg.svdvals(dw)
        assert rec["numeric_rank"] == int((sv > 1e-3 * sv[0]).sum()) <= 4  # LoRA: rank <= r
        p = sv / sv.sum()
        assert rec["effective_rank"] == pytest.approx(
            torch.exp(-(p * p.log()).sum()).item(), rel=1e-3
        )


def test_adalora_ranks_lora_drop_importance_and_full(tiny_model_dir, tmp_path, capsys):
    ada = _train(
        tiny_model_dir,
        tmp_path / "ada",
        "adapter.method=adalora",
        "adapter.adalora.init_r=4",
        "adapter.adalora.target_r=2",
        "adapter.adalora.delta_t=1",
        "train.max_steps=8",
    )
    drop = _train(
        tiny_model_dir,
        tmp_path / "drop",
        "adapter.method=lora-drop",
        "adapter.lora_drop.sample_ratio=0.5",
    )
    full = _train(tiny_model_dir, tmp_path / "full", "adapter.method=full", "train.max_steps=2")
    capsys.readouterr()

    assert main(["inspect", str(ada), "--out", str(tmp_path / "i_ada")]) == 0
    res = json.loads((tmp_path / "i_ada" / "inspect.json").read_text())[0]
    ranks = json.loads((ada.parent / "summary.json").read_text())["method_summary"]["ranks"]
    assert {x["name"]: x["adalora_rank"] for x in res["layers"]} == ranks
    assert (tmp_path / "i_ada" / "adalora_ranks_adalora.png").exists()

    assert main(["inspect", str(drop), "--out", str(tmp_path / "i_drop")]) == 0
    res = json.loads((tmp_path / "i_drop" / "inspect.json").read_text())[0]
    record = json.loads((drop / "lorakit.json").read_text())["extras"]["lora_drop"]
    assert {x["name"]: x["importance"] for x in res["layers"]} == record["importance"]
    assert sorted(x["name"] for x in res["layers"] if x["kept"]) == sorted(record["kept"])
    assert (tmp_path / "i_drop" / "lora_drop_importance_lora-drop.png").exists()

    # a full fine-tune: ΔW is the tuned weight minus the base weight, every linear layer
    assert main(["inspect", str(full), "--out", str(tmp_path / "i_full")]) == 0
    res = json.loads((tmp_path / "i_full" / "inspect.json").read_text())[0]
    tuned = {
        k[: -len(".weight")]: v.double()
        for k, v in load_file(str(full / "model.safetensors")).items()
    }
    base = _base_weights(tiny_model_dir)
    assert res["method"] == "full" and len(res["layers"]) == 14
    for rec in res["layers"]:
        ref = _direct(base[rec["name"]], tuned[rec["name"]])
        assert rec["delta_norm"] == pytest.approx(ref["delta_norm"], rel=1e-4)
        assert rec["delta_d"] == pytest.approx(ref["delta_d"], rel=1e-3, abs=1e-12)
