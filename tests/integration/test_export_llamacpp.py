"""llama.cpp itself serves a lorakit export: the embedded model's own GGUF file as the base, the
adapter exported with ``lorakit export --to gguf`` applied, greedy answers on a trained run's
held-out prompts compared with lorakit's. Needs llama-cpp-python, which builds llama.cpp from
source when installed (``make test-all`` installs it; minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lorakit import models
from lorakit.cli import main

pytestmark = pytest.mark.slow

AGREEMENT = 0.9


def _llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from "
        "source; `make test-all` installs it)")


def _base_gguf() -> Path:
    package, name, dist = models.EMBEDDED["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the embedded model's package {dist} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / name


def _load(llama_cpp, base: Path, adapter: Path):
    """llama.cpp's model with the adapter. On CPUs with AMX, llama.cpp's repacked AMX buffers
    crashed in decode; loading without the CPU's extra buffer types avoids them, where this
    binding exposes the switch."""
    fields = {f[0] for f in getattr(llama_cpp.llama_model_params, "_fields_", [])}
    if "use_extra_bufts" in fields:
        default = llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(base), lora_path=str(adapter), n_ctx=1024,
                               n_threads=2, seed=0, verbose=False, logits_all=False)
    finally:
        if "use_extra_bufts" in fields:
            llama_cpp.llama_model_default_params = default


def test_llama_cpp_answers_like_lorakit(tmp_path, capsys):
    llama_cpp = _llama_cpp()
    base = _base_gguf()
    run = tmp_path / "run"
    assert main(["train", "model=smollm2-135m", f"output_dir={run}", "adapter.method=lora",
                 "adapter.r=16", "adapter.alpha=32", "train.precision=fp32",
                 "train.max_steps=40", "train.lr=1e-3", "train.batch_size=8",
                 "eval.limit=20", "eval.compare_base=false"]) == 0
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(run), "--to", "gguf", "--out", str(out), "--no-heldout"]) == 0
    capsys.readouterr()

    import lorakit as lk
    from lorakit.training.evaluation import stop_token_ids

    model, tok = lk.load_model("smollm2-135m")
    stops = set(stop_token_ids(model, tok))
    summary = json.loads((run / "summary.json").read_text())
    cap = summary["tuned"]["generation"]["max_new_tokens"]
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) >= 10
    llm = _load(llama_cpp, base, out)
    agree = 0
    for p in preds:
        ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        body = []
        llm.reset()
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            if t in stops or len(body) >= cap:
                break
            body.append(t)
        agree += tok.decode(body, skip_special_tokens=True).strip() == p["prediction"].strip()
    assert agree >= AGREEMENT * len(preds), f"{agree} of {len(preds)} answers agree"
