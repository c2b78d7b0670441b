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


def test_adapter_folder_and_files_follow_the_umask(tmp_path):
    """An adapter folder is as readable as any folder the process makes (umask 022: by
    everyone), not private to its owner, so a server running as another user can load it."""
    import os
    import stat

    from tests.conftest import tiny_model

    old = os.umask(0o022)
    try:
        lk.save_adapter(lk.apply(tiny_model("llama"), r=4), tmp_path / "ad")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ad").stat().st_mode) == 0o755
    for f in (tmp_path / "ad").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f.name
