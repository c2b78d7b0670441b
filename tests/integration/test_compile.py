"""``train.compile``: the compiled decoder layers train as the eager ones do (the same loss
curve over 20 steps, no graph break), a failing compiler falls back to eager training with
one warning line, and ``auto`` (the default) times its first steps eagerly, then compiles only
where the measured gain pays back the compile (See Note: train.compile: auto)."""

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
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir, out, "train.max_steps=20", "eval.compare_base=false", *extra
                ),
            ]
        )
        == 0
    )
    return json.loads((out / "summary.json").read_text())["loss_curve"]


# DoRA in the default run (its norm cache and cancelled-row fix are the compile-specific code);
# each compiles in ~15 s with inductor's disk cache warm, ~60 s cold
@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "dora"])
def test_compiled_training_has_the_eager_loss_curve(method, tiny_model_dir, tmp_path, capsys):
    eager = _curve(
        tiny_model_dir, tmp_path / "eager", f"adapter.method={method}", "train.compile=false"
    )
    compiled = _curve(
        tiny_model_dir, tmp_path / "compiled", f"adapter.method={method}", "train.compile=true"
    )
    captured = capsys.readouterr()
    assert "train.compile failed" not in captured.out + captured.err
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile...
    assert not counters["graph_break"]  # ...each decoder layer whole (DoRA's norm included)
    assert len(eager) == len(compiled) == 20
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-4
    assert eager[-1] < eager[0]


@pytest.mark.slow  # ~35 s with inductor's disk cache warm, ~80 s cold: two graphs compiled
def test_compiled_longlora_training_has_the_eager_loss_curve(tiny_model_dir, tmp_path, capsys):
    """LongLoRA (S2-Attn in training, trainable embeddings and norms): compiled layers trace
    S2-Attn as plain SDPA calls on the shifted groups (S2Function runs eagerly only), without
    a graph break. The batches here are 51 tokens, padded to 56: 4 groups of 14, masked.

    Tolerances, measured in fp32 on this model and data (AMD EPYC): the compiled curve equaled
    the eager one bit for bit over the 10 steps; from the same parameters at every step, each
    compiled gradient was within 8e-7 of its largest element (one forward/backward of a tiny
    model: logits within 2e-7; full attention instead of S2 moves them by 0.5 and this run's
    first loss by 1e-3). So the first loss within 1e-6 (about one fp32 rounding of a loss of
    10.8) and the curve within 1e-5 (~10 roundings, for inductor's kernels on other CPUs)."""
    args = ("adapter.method=longlora", "adapter.r=4", "train.max_steps=10")
    eager = _curve(tiny_model_dir, tmp_path / "eager", *args, "train.compile=false")
    compiled = _curve(tiny_model_dir, tmp_path / "compiled", *args, "train.compile=true")
    captured = capsys.readouterr()
    assert "train.compile failed" not in captured.out + captured.err
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"]  # S2-Attn's grouping traced whole (see _token_pieces)
    assert len(eager) == len(compiled) == 10
    assert abs(compiled[0] - eager[0]) <= 1e-6  # before any optimizer step
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-5
    assert eager[-1] < eager[0]


@pytest.mark.slow  # ~10 s (dynamo's eager backend: tracing only)
def test_compiled_s2_attn_layers_serve_every_padded_length(monkeypatch):
    """One graph for batches of 45, 51 and 59 tokens (S2-grouped as 48, 56 and 64): the S2
    code keeps the lengths symbolic (See Note: symbolic spans, in attention/s2.py)."""
    import lorakit as lk
    import lorakit.training.runtime as runtime
    from tests.conftest import tiny_model

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    model = lk.apply(tiny_model("llama"), method="longlora").train()
    with runtime.compiled_layers(model, True):
        for length in (45, 51, 59):
            ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            mask[1, -5:] = 0
            model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    import lorakit.training.runtime as runtime

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")  # what inductor meets on a machine without one

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", broken_backend)
    eager = _curve(tiny_model_dir, tmp_path / "eager", "train.compile=false")
    fallback = _curve(tiny_model_dir, tmp_path / "fallback", "train.compile=true")
    captured = capsys.readouterr()
    warnings = [
        line
        for line in (captured.out + captured.err).splitlines()
        if "train.compile failed" in line
    ]
    assert len(warnings) == 1 and warnings[0].endswith("training eagerly"), warnings
    assert "RuntimeError: no C++ compiler" in warnings[0]
    assert fallback == pytest.approx(eager, abs=1e-6)


def test_auto_stays_eager_where_compiling_would_not_pay(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """The tiny model's steps take milliseconds: 16 steps left save far less than a compile
    (even with a gain measured, as for bf16)."""
    import lorakit.training.runtime as runtime

    monkeypatch.setattr(runtime, "COMPILE_MEASURED", {("cpu", torch.float32): (0.08, 64.5)})
    curve = _curve(tiny_model_dir, tmp_path / "auto")
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if "train.compile auto" in ln]
    assert len(lines) == 1 and lines[0].startswith("train.compile auto: eager (16 steps left x")
    assert "s of compiling)" in lines[0]
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["compiled"] is False
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(curve) == 20


def test_auto_compiles_from_the_step_after_the_probe_where_it_pays(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """With a measured gain that pays at once, auto compiles after the probe steps: the rest
    of the run is compiled (dynamo's own eager backend here, to keep the test short) and the
    loss curve is the eager one."""
    import lorakit.training.runtime as runtime

    monkeypatch.setattr(runtime, "COMPILE_MEASURED", {("cpu", torch.float32): (0.5, 0.0)})
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    eager = _curve(tiny_model_dir, tmp_path / "eager", "train.compile=false")
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    auto = _curve(tiny_model_dir, tmp_path / "auto")
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if "train.compile auto" in ln]
    assert len(lines) == 1 and lines[0].startswith("train.compile auto: compiled (16 steps")
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["compiled"] is True
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert auto == pytest.approx(eager, abs=1e-5)


def test_auto_decides_from_the_measurements_as_documented():
    from lorakit.training.runtime import COMPILE_MEASURED, compile_decision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    frac, cost = COMPILE_MEASURED[("cpu", torch.bfloat16)]
    assert compile_decision(cpu, torch.bfloat16, 1) == (None, "")  # times its probe steps first
    steps = int(cost / (frac * 2.0)) + 1  # just past the break-even at 2 s a step
    assert compile_decision(cpu, torch.bfloat16, 1, 2.0, steps)[0] is True
    assert compile_decision(cpu, torch.bfloat16, 1, 2.0, steps - 2)[0] is False
    # fp32 on CPU measured slower compiled: eager whatever the run's length
    assert COMPILE_MEASURED[("cpu", torch.float32)][0] < 0
    on, why = compile_decision(cpu, torch.float32, 1, 2.0, 10**6)
    assert on is False and why.endswith("slower than eager")
    assert compile_decision(cpu, torch.float32, 2) == (
        False,
        "2 processes: a failed compile cannot fall back to eager",
    )
    assert compile_decision(cuda, torch.bfloat16, 1) == (False, "not measured on cuda in bfloat16")
