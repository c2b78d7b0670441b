"""The verdict rules of the compare report's claims, on hand-made summaries."""

from __future__ import annotations

import pytest

from lorakit.analysis.claims import (
    FAILS,
    HOLDS,
    NA,
    TIE,
    combine,
    differs,
    ratio_verdict,
    steps_to,
    verdicts,
)


def row(
    quality=0.5,
    spread=0.02,
    params=1000,
    mem=1000.0,
    step=1.0,
    forgetting=0.01,
    f_spread=0.001,
    curve=None,
    **kw,
):
    return {
        "quality": quality,
        "quality_metric": "exact_match",
        "spread": {"quality": spread, "forgetting": f_spread},
        "trainable_params": params,
        "peak_memory_mb": mem,
        "median_step_time_s": step,
        "forgetting": forgetting,
        "loss_curve": curve or [2.0 - i / 50 for i in range(100)],
        **kw,
    }


def by_id(rows, dm_dd=None):
    return {c["id"]: c for c in verdicts(rows, dm_dd or {})}


def test_difference_band_is_twice_the_combined_spread():
    assert differs(0.50, 0.03, 0.42, 0.03) == 0  # 0.08 <= 2 * 0.042
    assert differs(0.50, 0.01, 0.42, 0.01) == 1
    assert differs(0.42, 0.01, 0.50, 0.01) == -1
    assert differs(0.5, None, 0.5, None) == 0
    assert ratio_verdict(0.5, 1.0, 0.1) == HOLDS
    assert ratio_verdict(1.05, 1.0, 0.1) == TIE
    assert ratio_verdict(1.3, 1.0, 0.1) == FAILS
    assert combine([HOLDS, TIE]) == TIE and combine([TIE, FAILS]) == FAILS
    assert combine([FAILS, NA]) == NA and combine([HOLDS, HOLDS]) == HOLDS


def test_full_fine_tuning_memory_and_forgetting():
    rows = {"lora": row(mem=1300, forgetting=0.004), "full": row(mem=3300, forgetting=0.03)}
    c = by_id(rows)
    assert c["full-memory"]["verdict"] == HOLDS and "2.54x" in c["full-memory"]["figures"]
    assert c["full-forgets"]["verdict"] == HOLDS
    rows["full"] = row(mem=1500, forgetting=0.0045)  # 1.15x; forgetting within the band
    c = by_id(rows)
    assert c["full-memory"]["verdict"] == FAILS and c["full-forgets"]["verdict"] == TIE
    rows["full"] = row(mem=3300, forgetting=-0.02)
    assert by_id(rows)["full-forgets"]["verdict"] == FAILS


def test_memory_claims_are_judged_on_exact_bytes_at_equal_settings_and_name_the_measure():
    eq = "qlora.lora-settings"
    rows = {
        "lora": row(mem=1227, exact_memory_mib=400.0),
        "qlora": row(mem=1514, exact_memory_mib=700.0),  # the r 64 preset: not judged
        eq: row(mem=1514, exact_memory_mib=250.0),
    }
    c = by_id(rows)["qlora-memory"]
    assert c["verdict"] == HOLDS  # 0.62x by exact bytes, though the peak RSS is 1.23x
    assert c["figures"].startswith("by exact memory") and "0.62x" in c["figures"]
    assert "peak memory qlora 1514 MB vs lora 1227 MB: 1.23x" in c["figures"]
    del rows[eq]["exact_memory_mib"]  # a run without exact bytes: judged by the peak
    c = by_id(rows)["qlora-memory"]
    assert c["verdict"] == FAILS and c["figures"].startswith("by peak memory")
    del rows[eq]
    c = by_id(rows)["qlora-memory"]
    assert c["verdict"] == NA and eq in c["figures"]
    rows["full"] = row(mem=1300, exact_memory_mib=2400.0)  # 6x by exact bytes, 1.06x by RSS
    c = by_id(rows)["full-memory"]
    assert c["verdict"] == HOLDS and c["figures"].startswith("by exact memory")


def test_similar_quality_claims_hold_within_the_band_or_better():
    rows = {
        "lora": row(quality=0.41, spread=0.05),
        "full": row(quality=0.46, spread=0.05),
        "lora-fa": row(quality=0.34, spread=0.047, params=500),
    }
    c = by_id(rows)
    assert c["lora-quality"]["verdict"] == HOLDS  # 0.05 apart, band 0.14
    assert c["lorafa-params"]["verdict"] == HOLDS
    rows["lora"] = row(quality=0.20, spread=0.01)
    rows["full"] = row(quality=0.60, spread=0.01)
    assert by_id(rows)["lora-quality"]["verdict"] == FAILS
    rows["lora-fa"] = row(quality=0.9, spread=0.01, params=900)  # better, but 0.9x the params
    assert by_id(rows)["lorafa-params"]["verdict"] == FAILS


def test_loraplus_learns_faster_from_the_loss_curves():
    lora = [2.0 - i / 100 for i in range(100)]  # reaches 1.01 at the end
    fast = [2.0 - i / 50 for i in range(100)]  # twice as steep
    c = by_id({"lora": row(curve=lora), "lora+": row(curve=fast)})
    assert c["loraplus-speed"]["verdict"] == HOLDS and "as fast" in c["loraplus-speed"]["figures"]
    assert steps_to(fast, 1.5) < steps_to(lora, 1.5)
    c = by_id({"lora": row(curve=lora), "lora+": row(curve=list(lora))})
    assert c["loraplus-speed"]["verdict"] == TIE
    c = by_id({"lora": row(curve=lora), "lora+": row(curve=[2.0] * 100)})
    assert c["loraplus-speed"]["verdict"] == FAILS and "never" in c["loraplus-speed"]["figures"]


def test_adalora_needs_the_same_final_rank_and_a_difference_beyond_the_spread():
    lora, ada = (
        row(quality=0.41, spread=0.01, rank=16),
        row(quality=0.48, spread=0.01, final_rank=16),
    )
    assert by_id({"lora": lora, "adalora": ada})["adalora"]["verdict"] == HOLDS
    ada["quality"] = 0.42
    assert by_id({"lora": lora, "adalora": ada})["adalora"]["verdict"] == TIE
    ada["quality"] = 0.09
    assert by_id({"lora": lora, "adalora": ada})["adalora"]["verdict"] == FAILS
    ada["final_rank"] = 8
    assert by_id({"lora": lora, "adalora": ada})["adalora"]["verdict"] == NA


def test_loradrop_needs_fewer_params_less_time_and_similar_quality():
    lora = row(quality=0.41, spread=0.05, params=4_884_480, step=0.59)
    drop = row(quality=0.38, spread=0.05, params=264_192, step=0.50)
    assert by_id({"lora": lora, "lora-drop": drop})["loradrop"]["verdict"] == HOLDS
    drop["median_step_time_s"] = 0.60  # as slow as LoRA: within the timing tolerance
    assert by_id({"lora": lora, "lora-drop": drop})["loradrop"]["verdict"] == TIE
    drop["quality"] = 0.1
    assert by_id({"lora": lora, "lora-drop": drop})["loradrop"]["verdict"] == FAILS


def test_dora_correlation_claim_uses_significance_over_layers():
    dm = {
        "lora": {"corr": 0.32, "layers": 210},
        "dora": {"corr": -0.30, "layers": 210},
        "full": {"corr": -0.2, "layers": 210},
    }
    c = by_id({}, dm)["dora-dm-dd"]
    assert c["verdict"] == HOLDS and "lora +0.32" in c["figures"]
    dm["dora"]["corr"] = -0.02  # |z| below 1.96 / sqrt(207)
    assert by_id({}, dm)["dora-dm-dd"]["verdict"] == TIE
    dm["lora"]["corr"] = 0.05  # LoRA's own correlation not positive: the premise fails
    assert by_id({}, dm)["dora-dm-dd"]["verdict"] == FAILS
    assert by_id({}, {"lora": dm["lora"]})["dora-dm-dd"]["verdict"] == NA


def test_s2_attn_claim_and_missing_rows():
    rows = {
        "long.longlora": row(step=4.8, quality=0.9, spread=0.05),
        "long.longlora.full-attn": row(step=5.3, quality=0.93, spread=0.05),
    }
    c = by_id(rows)["s2-attn"]
    assert c["verdict"] == TIE and "0.91x" in c["figures"]  # 9% faster: within the tolerance
    rows["long.longlora"]["median_step_time_s"] = 3.0
    assert by_id(rows)["s2-attn"]["verdict"] == HOLDS
    rows["long.longlora"]["quality"] = 0.2
    assert by_id(rows)["s2-attn"]["verdict"] == FAILS
    c = by_id({"lora": row()})
    assert c["qlora-memory"]["verdict"] == NA and "qlora" in c["qlora-memory"]["figures"]
    assert len(c) == 10 and all(x["verdict"] in (HOLDS, FAILS, TIE, NA) for x in c.values())


@pytest.mark.parametrize("max_len", [512, 2048, 4096])
def test_passkey_rows_hold_the_key_and_follow_max_seq_len(max_len, _smollm2_once):
    from lorakit.training.tasks import get_task

    _, tok = _smollm2_once
    task = get_task("passkey")
    rows = task.rows("test", max_len=max_len)
    assert len(rows) == task.sizes["test"]
    keys = set()
    for r in rows:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert answer.isdigit() and len(answer) == 5
        assert f"The pass key is {answer}." in user and user.endswith("number only.")
        keys.add(answer)
        n = len(tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
        assert max_len * 0.45 <= n <= max_len, (n, max_len)
    assert len(keys) > 0.9 * len(rows)  # random keys, not one repeated
    assert task.rows("test", max_len=max_len) == rows  # deterministic
    train_keys = {r["messages"][1]["content"] for r in task.rows("train", max_len=max_len)}
    assert train_keys != keys


def test_docs_print_the_settings_table_of_the_code():
    from pathlib import Path

    from lorakit.analysis.pages import md_table
    from lorakit.analysis.settings import settings_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "compare.md").read_text()
    assert md_table(*settings_table()) in doc


def test_lr_sweep_picks_the_lowest_validation_loss_per_row(tmp_path):
    import json
    from types import SimpleNamespace

    from lorakit.analysis.report import best_lr_factors

    def plan(name, row, factor, seed=0, loss=None):
        if loss is not None:
            (tmp_path / name).mkdir()
            (tmp_path / name / "summary.json").write_text(
                json.dumps({"tuned": {"valid_loss": loss}})
            )
        return SimpleNamespace(name=name, row=row, lr_factor=factor, seed_index=seed)

    plans = [
        plan("lora", "lora", 1.0, loss=0.40),
        plan("lora.lr0.0001", "lora", 0.5, loss=0.45),
        plan("lora.lr0.0004", "lora", 2.0, loss=0.31),
        plan("lora.seed1", "lora", 2.0, seed=1, loss=0.10),  # seeds do not vote
        plan("full", "full", 1.0, loss=0.5),
        plan("full.lr4e-05", "full", 2.0),  # failed
        plan("dora", "dora", 1.0, loss=0.39),
    ]
    assert best_lr_factors(tmp_path, plans) == {"lora": 2.0, "full": 1.0, "dora": 1.0}
