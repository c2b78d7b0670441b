"""``train.compile``: the compiled decoder layers train as the eager ones do (the same loss
curve over 20 steps, no graph break), and a failing compiler falls back to eager training with
one warning line."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from tests.conftest import tiny_run_args


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _curve(tiny_model_dir, out, *extra) -> list[float]:
    assert main(["train", *tiny_run_args(tiny_model_dir, out, "train.max_steps=20",
                                          "eval.compare_base=false", *extra)]) == 0
    return json.loads((out / "summary.json").read_text())["loss_curve"]


# DoRA in the default run (its norm cache and cancelled-row fix are the compile-specific code);
# each compiles in ~15 s with inductor's disk cache warm, ~60 s cold
@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "dora"])
def test_compiled_training_has_the_eager_loss_curve(method, tiny_model_dir, tmp_path, capsys):
    eager = _curve(tiny_model_dir, tmp_path / "eager", f"adapter.method={method}")
    compiled = _curve(tiny_model_dir, tmp_path / "compiled", f"adapter.method={method}",
                      "train.compile=true")
    captured = capsys.readouterr()
    assert "train.compile failed" not in captured.out + captured.err
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile...
    assert not counters["graph_break"]  # ...each decoder layer whole (DoRA's norm included)
    assert len(eager) == len(compiled) == 20
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-4
    assert eager[-1] < eager[0]


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tiny_model_dir, tmp_path,
                                                                  capsys, monkeypatch):
    import lorakit.training.runtime as runtime

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")  # what inductor meets on a machine without one

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", broken_backend)
    eager = _curve(tiny_model_dir, tmp_path / "eager")
    fallback = _curve(tiny_model_dir, tmp_path / "fallback", "train.compile=true")
    captured = capsys.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines()
                if "train.compile failed" in line]
    assert len(warnings) == 1 and warnings[0].endswith("training eagerly"), warnings
    assert "RuntimeError: no C++ compiler" in warnings[0]
    assert fallback == pytest.approx(eager, abs=1e-6)
