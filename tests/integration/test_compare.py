"""lorakit compare end to end on a tiny model: the report's figures are the runs' summaries,
finished methods are not re-run, failures and unavailable methods get a row with the reason,
and the HTML page renders in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.analysis.compare import compare
from lorakit.analysis.report import COLUMNS
from lorakit.cli import main
from tests.conftest import tiny_run_args

METHODS = ["lora", "dora", "full"]
QLORA_ROWS = ["qlora", "qlora.lora-settings"]  # the paper's preset, and at LoRA's settings


def _tiny(model_dir) -> list[str]:
    return [a for a in tiny_run_args(model_dir, "x") if not a.startswith("output_dir")]


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the runs are child processes; 2 cores are shared
        compare(None, _tiny(tiny_model_dir), METHODS + ["qlora"], out, log=lambda s: None)
    return out


def _md_rows(report_md: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in report_md.splitlines() if ln.startswith("| ")]
    lines = lines[next(i for i, ln in enumerate(lines) if "| trainable params |" in ln) :]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] in METHODS + QLORA_ROWS and len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.mark.slow  # the compare fixture trains every method: ~45 s
def test_report_figures_are_each_runs_summary(compared):
    md = (compared / "report.md").read_text()
    table = _md_rows(md)
    report = json.loads((compared / "report.json").read_text())
    by_method = {r["method"]: r for r in report["rows"]}
    for m in METHODS + QLORA_ROWS:
        s = json.loads((compared / m / "summary.json").read_text())
        exact = s["exact_memory"]
        expect = {
            "exact_memory_mib": sum(
                exact[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_bytes")
            )
            / 2**20,
            "params_mib": exact["params_bytes"] / 2**20,
            "grads_mib": exact["grads_bytes"] / 2**20,
            "optimizer_mib": exact["optimizer_bytes"] / 2**20,
            "saved_mib": exact["saved_bytes"] / 2**20,
            "trainable_params": s["trainable_params"],
            "trainable_pct": 100 * s["trainable_params"] / s["total_params"],
            "peak_memory_mb": s["peak_memory_mb"],
            "median_step_time_s": s["median_step_time_s"],
            "tokens_per_s": s["tokens_per_s"],
            "exact_match": s["tuned"]["exact_match"],
            "valid_loss": s["tuned"]["valid_loss"],
            "forgetting": s["tuned"]["general_text_loss"] - s["base"]["general_text_loss"],
            "final_train_loss": s["final_train_loss"],
        }
        for key, header, fmt in COLUMNS:
            if key in expect:
                assert by_method[m][key] == pytest.approx(expect[key], rel=1e-12), (m, key)
                assert table[m][header].split(" ± ")[0] == fmt.format(expect[key]), (m, key)
    # the 16-bit base is shown once, from a non-quantized run, and is what that run measured
    lora_base = json.loads((compared / "lora" / "summary.json").read_text())["base"]
    assert report["base"]["from"] == "lora"
    assert report["base"]["general_text_loss"] == lora_base["general_text_loss"]
    for png in (
        "trainable_params",
        "peak_memory_mb",
        "median_step_time_s",
        "tokens_per_s",
        "exact_match",
        "valid_loss",
        "forgetting",
        "loss_curves",
        "dm_dd",
    ):
        assert (compared / f"{png}.png").stat().st_size > 1000, png
        assert "![" in md and f"({png}.png)" in md
    html = (compared / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 9 and 'src="http' not in html


@pytest.mark.slow  # the compare fixture trains every method: ~45 s
def test_exact_memory_columns_equal_a_direct_count(compared):
    """The run's parameters, gradients and AdamW state, counted by hand on the tiny model
    with the run's own config; the QLoRA row of the memory claim has LoRA's settings."""
    from lorakit import inject, models
    from lorakit.config import load_run_config

    report = json.loads((compared / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    for m in ("lora", "full"):
        cfg = load_run_config(str(compared / m / "config.yaml"))
        model, _ = models.load_model(cfg.model)
        inject.apply(model, cfg.adapter)
        params = {id(p): p for p in model.parameters()}.values()  # the tied head once
        trainable = [p for p in params if p.requires_grad]
        # a training forward, as the run's: an fp32 LoRA layer then keeps W0 in a [W0; A]
        # storage (adapters/lora.py, Note: A folded into the frozen GEMM), r·d_in more bytes
        model.train()(input_ids=torch.tensor([[1, 5, 9]]))
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*params, *model.buffers()]
        }  # each storage once
        assert all(p.dtype == torch.float32 for p in params)
        assert rows[m]["params_mib"] * 2**20 == pytest.approx(sum(storages.values()))
        assert rows[m]["grads_mib"] * 2**20 == pytest.approx(4 * sum(p.numel() for p in trainable))
        assert rows[m]["optimizer_mib"] * 2**20 == pytest.approx(  # 2 moments + a step count
            sum(8 * p.numel() + 4 for p in trainable)
        )
        assert rows[m]["saved_mib"] > 0
    cfgs = {
        m: yaml.safe_load((compared / m / "config.yaml").read_text())["adapter"]
        for m in ["lora", *QLORA_ROWS]
    }
    eq = cfgs["qlora.lora-settings"]
    assert eq["quantize"] == "nf4" == cfgs["qlora"]["quantize"]
    assert cfgs["qlora"]["alpha"] == 16 and cfgs["qlora"]["dropout"] == 0.05  # the preset's
    for k in ("r", "alpha", "dropout", "target_modules"):
        assert eq[k] == cfgs["lora"][k], k
    claim = {c["id"]: c for c in report["claims"]}["qlora-memory"]
    assert claim["figures"].startswith("by exact memory") and "peak memory" in claim["figures"]
    # the 4-bit base holds fewer bytes than LoRA's fp32 base at the same adapter
    assert rows["qlora.lora-settings"]["params_mib"] < rows["lora"]["params_mib"]


@pytest.mark.slow  # the compare fixture trains every method: ~45 s
def test_each_run_measures_its_own_base_or_an_identical_one(compared):
    """The base is measured in a process of its own (so no peak memory includes it): the
    16-bit runs share one measurement, QLoRA measures its 4-bit base."""
    bases = {
        m: json.loads((compared / m / "summary.json").read_text())["base"]
        for m in METHODS + ["qlora"]
    }
    assert bases["lora"] == bases["dora"] == bases["full"]
    assert bases["qlora"] != bases["lora"]
    assert (compared / "logs" / "lora.base.log").exists()
    assert (compared / "logs" / "qlora.base.log").exists()
    assert not (compared / "logs" / "dora.base.log").exists()


@pytest.mark.slow  # the compare fixture trains every method: ~45 s
def test_finished_methods_are_not_run_again(compared, tiny_model_dir):
    stamps = {m: (compared / m / "summary.json").stat().st_mtime_ns for m in METHODS}
    msgs: list[str] = []
    compare(None, _tiny(tiny_model_dir), METHODS, compared, log=msgs.append)
    assert sum("finished earlier" in s for s in msgs) == len(METHODS)
    assert stamps == {m: (compared / m / "summary.json").stat().st_mtime_ns for m in METHODS}
    # other settings in the same folder are refused rather than mixed into one table
    with pytest.raises(Exception, match="other settings"):
        compare(
            None, _tiny(tiny_model_dir) + ["train.lr=5e-4"], METHODS, compared, log=lambda s: None
        )


def test_failed_and_unavailable_methods_get_a_row_with_the_reason(
    tiny_model_dir, tmp_path, monkeypatch
):
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\necho 'some progress'\necho 'lorakit: error: the loss became "
        "nan at step 3' >&2\nexit 2\n"
    )
    fake.chmod(0o755)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    out = tmp_path / "cmp"
    report = compare(
        None, _tiny(tiny_model_dir), ["lora-fa", "qlora"], out, log=lambda s: None, python=str(fake)
    )
    missing = {x["method"]: x for x in report["missing"]}
    assert missing["lora-fa"]["status"] == "failed"
    assert missing["lora-fa"]["reason"] == "the loss became nan at step 3"
    assert missing["qlora"]["status"] == "unavailable"
    assert "bitsandbytes" in missing["qlora"]["reason"]
    md = (out / "report.md").read_text()
    assert "the loss became nan at step 3" in md and "bitsandbytes" in md


def test_bad_override_fails_before_any_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--methods",
                "lora,dora",
                "--out",
                str(out),
                *_tiny(tiny_model_dir),
                "train.nonsense=1",
            ]
        )
        == 2
    )
    assert "train.nonsense" in capsys.readouterr().err
    assert not (out / "lora").exists()
    assert main(["compare", "--methods", "lora,nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow  # the compare fixture trains every method: ~45 s
def test_html_report_renders_in_headless_chromium(compared):
    from matplotlib.image import imread

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        print("skipped: chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); required in CI")
    shot = compared / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1200,900",
                (compared / "report.html").resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert shot.exists(), "chromium wrote no screenshot"
    img = imread(str(shot))[..., :3]
    assert img.shape[0] >= 800 and img.shape[1] >= 1100
    non_white = (img < 0.9).any(axis=-1).mean()
    assert img.std() > 0.05 and non_white > 0.02, (img.std(), non_white)


def test_a_method_option_override_goes_to_its_method_only():
    from lorakit.analysis.compare import method_overrides

    args = ["adapter.lora_drop.threshold=0.7", "adapter.adalora.target_r=4", "train.lr=1e-3"]
    lora, _ = method_overrides(None, args, "lora+", Path("x"))
    assert "train.lr=1e-3" in lora and not any("lora_drop" in a or "adalora" in a for a in lora)
    drop, _ = method_overrides(None, args, "lora-drop", Path("x"))
    assert "adapter.lora_drop.threshold=0.7" in drop and not any("adalora" in a for a in drop)


def test_paper_settings_apply_where_the_user_left_the_key_unset():
    from lorakit.analysis.compare import method_overrides

    args, applied = method_overrides(None, ["train.max_steps=200"], "adalora", Path("x"))
    got = {k: v for k, v, _ in applied}
    assert got["train.lr"] == 1e-3 and got["adapter.adalora.target_r"] == 16  # LoRA's rank
    assert got["adapter.adalora.init_r"] == 24 and got["adapter.adalora.tinit"] == 20
    assert got["adapter.adalora.tfinal"] == 60 and "adapter.adalora.tinit=20" in args
    args, applied = method_overrides(None, ["train.lr=5e-4", "adapter.r=8"], "adalora", Path("x"))
    got = {k: v for k, v, _ in applied}
    assert "train.lr" not in got and got["adapter.adalora.target_r"] == 8
    assert "train.lr=5e-4" in args and not any(a.startswith("train.lr=0.001") for a in args)
    _, applied = method_overrides(None, [], "full", Path("x"))
    assert {k: v for k, v, _ in applied}["train.lr"] == 2e-5


def test_seeds_give_each_row_a_mean_and_a_spread(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    report = compare(
        None,
        _tiny(tiny_model_dir) + ["eval.compare_base=false"],
        ["lora"],
        out,
        log=lambda s: None,
        seeds=2,
    )
    (row,) = report["rows"]
    runs = [json.loads((out / d / "summary.json").read_text()) for d in ("lora", "lora.seed1")]
    seeds = [
        yaml.safe_load((out / d / "config.yaml").read_text())["train"]["seed"]
        for d in ("lora", "lora.seed1")
    ]
    assert seeds == [0, 1]
    losses = [r["final_train_loss"] for r in runs]
    assert losses[0] != losses[1]  # two seeds, two runs
    assert row["seeds"] == 2 and row["final_train_loss"] == pytest.approx(sum(losses) / 2)
    assert row["spread"]["final_train_loss"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    md = (out / "report.md").read_text()
    assert "over 2 seeds" in md and " ± " in md
    assert [c["id"] for c in report["claims"]][:2] == ["full-memory", "full-forgets"]
    assert "## Claims" in md and md.index("## Claims") < md.index("## Methods")
