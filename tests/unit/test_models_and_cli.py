"""load_model errors, the embedded model's cache, and the CLI's basic commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorakit as lk
from lorakit.cli import main


def test_missing_model_folder_is_one_sentence(tmp_path):
    with pytest.raises(lk.LorakitError, match="not a model folder"):
        lk.load_model(str(tmp_path / "nope"))


def test_embedded_model_is_cached_as_safetensors(smollm2):
    from lorakit.models import cache_dir

    model, tok = smollm2
    assert (cache_dir() / "smollm2-135m" / "model.safetensors").exists()
    assert model.config.model_type == "llama" and tok.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) > 100e6


def test_cli_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in (
        "lora",
        "dora",
        "lora-fa",
        "adalora",
        "lora-drop",
        "full",
        "qlora",
        "lora+",
        "longlora",
    ):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_cli_help_runs_as_a_process():
    r = subprocess.run(
        [sys.executable, "-m", "lorakit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and "methods" in r.stdout


@pytest.mark.parametrize("offline", ["1", ""])
def test_mistyped_embedded_name_fails_at_once_with_a_suggestion(monkeypatch, offline):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    t0 = time.perf_counter()
    with pytest.raises(lk.LorakitError, match="did you mean 'smollm2-135m'"):
        lk.load_model("smollm2-135")
    assert time.perf_counter() - t0 < 5  # no network retries


def test_uncached_hub_id_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        lk.LorakitError, match="not a local folder nor in the local Hugging Face cache"
    ):
        lk.load_model("nobody/no-such-model-xyz")


def test_auto_map_of_a_type_transformers_knows_needs_no_remote_code(tmp_path):
    """transformers ignores auto_map for a model type it has its own class for (a local copy
    of a phi3 repository): such a folder loads without trust_remote_code; an unknown type
    with auto_map is refused in one sentence."""
    import json

    from lorakit.errors import LorakitError
    from lorakit.models import check_model_folder

    (tmp_path / "tokenizer.json").write_text("{}")
    auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "auto_map": auto_map}))
    check_model_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": auto_map}))
    with pytest.raises(LorakitError, match="trust_remote_code=true"):
        check_model_folder(str(tmp_path))
    check_model_folder(str(tmp_path), trust_remote_code=True)


def test_an_os_error_without_errno_is_no_file_error():
    from lorakit.files import file_error

    assert file_error(OSError("Repository not found")) is None
    assert file_error(FileNotFoundError(2, "No such file", "x.json")) is not None
