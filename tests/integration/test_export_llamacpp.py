"""lorakit's GGUF adapters against llama.cpp's own code.

1. The same adapter through llama.cpp's converter (``convert_lora_to_gguf.py``, from a
   llama.cpp source tree named by ``LLAMA_CPP_SRC``; ``make test-all`` unpacks the one inside
   the llama-cpp-python source package) and through ``lorakit export --to gguf``: the same
   keys, tensor names, types, shapes and values.
2. llama.cpp itself serves a lorakit export (slow): the embedded model's own GGUF file as the
   base, the exported adapter applied, greedy answers on a trained run's held-out prompts
   compared with lorakit's. Needs llama-cpp-python, which builds llama.cpp from source when
   installed (``make test-all`` installs it; minutes on 2 cores)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import lorakit as lk
from lorakit import models
from lorakit.cli import main
from lorakit.export import export_model
from tests.conftest import load_llama_cpp, train_steps

AGREEMENT = 0.9


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gguf_equals_llama_cpp_converters_output(outtype, tiny_model_dir, tmp_path):
    src = Path(os.environ.get("LLAMA_CPP_SRC", "/nonexistent"))
    if not (src / "convert_lora_to_gguf.py").is_file():
        pytest.skip(
            "no llama.cpp source tree: set LLAMA_CPP_SRC (make test-all unpacks the "
            "one inside the llama-cpp-python source package)"
        )
    model, _ = lk.load_model(str(tiny_model_dir))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    model = train_steps(
        lk.apply(model, method="lora", r=4, alpha=8, use_rslora=True, target_modules=targets)
    )
    twin = copy.deepcopy(model)
    export_model(model, tmp_path / "lora", "lora")
    export_model(twin, tmp_path / "ours.gguf", "gguf", outtype=outtype)
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    done = subprocess.run(
        [
            sys.executable,
            str(src / "convert_lora_to_gguf.py"),
            str(tmp_path / "lora"),
            "--base",
            str(tiny_model_dir),
            "--outfile",
            str(tmp_path / "theirs.gguf"),
            "--outtype",
            outtype,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = (gguf.GGUFReader(str(tmp_path / f)) for f in ("ours.gguf", "theirs.gguf"))
    for key in (
        "general.type",
        "general.architecture",
        "adapter.type",
        "adapter.lora.alpha",
        "general.quantization_version",
    ):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    assert set(a) == set(b) and len(a) == 2 * 6 * 2
    for name, t in b.items():
        assert a[name].tensor_type == t.tensor_type, name
        assert list(a[name].shape) == list(t.shape), name
        assert np.array_equal(
            gguf.quants.dequantize(a[name].data, a[name].tensor_type),
            gguf.quants.dequantize(t.data, t.tensor_type),
        ), name


def _llama_cpp():
    return pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (it builds llama.cpp from "
        "source; `make test-all` installs it)",
    )


def _base_gguf() -> Path:
    package, name, dist = models.EMBEDDED["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the embedded model's package {dist} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / name


def _load(llama_cpp, base: Path, adapter: Path):
    """llama.cpp's model with the adapter (tests/conftest.py ``load_llama_cpp``: without the
    CPU's extra buffer types, whose AMX matmul crashed in decode)."""
    return load_llama_cpp(
        llama_cpp,
        base,
        lora_path=str(adapter),
        n_ctx=1024,
        n_threads=2,
        seed=0,
        logits_all=False,
    )


def agreement(llama_cpp, run: Path, adapter_gguf: Path) -> tuple[int, int, list[str]]:
    """(answers of llama.cpp equal to lorakit's, answers, the differing ones) on the run's
    held-out prompts: the run's predictions.jsonl, the same prompt tokens, greedy, the same
    stop tokens and cap."""
    from lorakit.training.evaluation import stop_token_ids

    model, tok = lk.load_model("smollm2-135m")
    stops = set(stop_token_ids(model, tok))
    summary = json.loads((run / "summary.json").read_text())
    cap = summary["tuned"]["generation"]["max_new_tokens"]
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    llm = _load(llama_cpp, _base_gguf(), adapter_gguf)
    agree, differ = 0, []
    for p in preds:
        ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        body: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            if t in stops or len(body) >= cap:
                break
            body.append(t)
        got = tok.decode(body, skip_special_tokens=True).strip()
        agree += got == p["prediction"].strip()
        if got != p["prediction"].strip():
            differ.append(f"{p['reference']!r}: lorakit {p['prediction']!r}, llama.cpp {got!r}")
    return agree, len(preds), differ


@pytest.mark.slow
def test_llama_cpp_answers_like_lorakit(tmp_path, capsys):
    """The base is the package's Q4_1 file, which lorakit reads dequantized; llama.cpp
    multiplies Q4_1 weights by 8-bit-quantized activations, so even the base alone answers
    differently on some prompts (30 of 40 of the embedded model's untuned answers agreed
    here). An adapter trained to answer confidently (100 steps) leaves few near-ties: 38 of
    40 agreed here; 12 steps gave 35 of 40."""
    llama_cpp = _llama_cpp()
    _base_gguf()
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model=smollm2-135m",
                f"output_dir={run}",
                "adapter.method=lora",
                "adapter.r=8",
                "adapter.alpha=16",
                "train.precision=fp32",
                "train.max_steps=100",
                "train.lr=1e-3",
                "train.batch_size=4",
                "eval.limit=40",
                "eval.compare_base=false",
            ]
        )
        == 0
    )
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(run), "--to", "gguf", "--out", str(out), "--no-heldout"]) == 0
    capsys.readouterr()
    agree, n, differ = agreement(llama_cpp, run, out)
    assert n >= 40 and agree >= AGREEMENT * n, f"{agree} of {n} answers agree: {differ}"
