"""Every YAML config shipped in configs/ loads and validates (litgpt's rule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.config import RunConfig, load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_run_config(str(path))
    assert isinstance(cfg, RunConfig)
    assert cfg.adapter.method in ("lora", "dora", "lora-fa", "adalora", "lora-drop", "full")


def test_overrides_apply_on_top_of_a_file():
    cfg = load_run_config(str(CONFIGS[0]), ["train.max_steps=7", "adapter.r=4"])
    assert cfg.train.max_steps == 7 and cfg.adapter.r == 4
