"""Safety: no pickle anywhere, trust_remote_code off by default, config values never run."""

from __future__ import annotations

import re
from pathlib import Path

import lorakit as lk
from lorakit.config import RunConfig

SRC = Path(__file__).resolve().parents[2] / "src" / "lorakit"
FORBIDDEN = [
    (r"\btorch\.load\s*\(", "torch.load unpickles"),
    (r"\bimport pickle\b|\bpickle\.load", "pickle"),
    (r"\byaml\.load\s*\(", "yaml.load can build objects; use yaml.safe_load"),
    (r"(?<![\w.])eval\s*\([^)]", "eval runs strings"),
    (r"(?<![\w.])exec\s*\([^)]", "exec runs strings"),
    (r"use_safetensors\s*=\s*False", "non-safetensors weights"),
    (r"weights_only\s*=\s*False", "unpickling"),
]


def test_no_unsafe_loading_in_the_source():
    found = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for pattern, why in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(SRC)}:{line}: {why}")
    assert not found, found


def test_trust_remote_code_is_off_unless_asked():
    import inspect

    assert RunConfig().trust_remote_code is False
    assert inspect.signature(lk.load_model).parameters["trust_remote_code"].default is False


def test_weights_written_are_safetensors_only(tmp_path):
    from tests.conftest import tiny_model

    lk.save_adapter(lk.apply(tiny_model(), r=2), tmp_path / "a")
    suffixes = {p.suffix for p in (tmp_path / "a").iterdir()}
    assert suffixes <= {".json", ".safetensors", ".md"}
