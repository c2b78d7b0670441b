"""Shared fixtures: tiny random-initialized causal LMs built from configs (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lorakit.training.tasks import get_task

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(arch: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0):
    """A tiny random model in eval mode, fp32, 'eager' attention (deterministic)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def batch(vocab: int = 96, n: int = 2, length: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def train_steps(model, steps: int = 3, lr: float = 1e-2, seed: int = 2):
    """A few AdamW steps on a language-modelling loss, so that B (and all else) is non-zero."""
    import lorakit as lk

    params = list(lk.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for i in range(steps):
        ids = batch(seed=seed + i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def _smollm2_once():
    import lorakit as lk

    return lk.load_model("smollm2-135m")


@pytest.fixture
def smollm2(_smollm2_once):
    """A fresh copy of the embedded SmolLM2-135M (fp32) and its tokenizer (loaded once)."""
    import copy

    model, tok = _smollm2_once
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _smollm2_once):
    """A saved tiny random Llama with SmolLM2's tokenizer (and chat template): a model folder
    that ``lorakit train model=<dir>`` trains in seconds."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tok = _smollm2_once
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def task_rows_file(folder: Path, task: str, n: int) -> Path:
    """The first ``n`` training rows of a built-in task as a JSONL file, as a user's data."""
    p = folder / f"{task}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in get_task(task).rows("train")[:n]))
    return p


def tiny_run_args(model_dir, out, *extra):
    """CLI overrides for a fast, deterministic run of the built-in task on the tiny model."""
    return [
        f"model={model_dir}",
        f"output_dir={out}",
        "train.precision=fp32",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.lr=1e-3",
        "data.limit=64",
        "eval.limit=8",
        "eval.max_new_tokens=4",
        "adapter.r=4",
        *extra,
    ]


def train_cli(capsys, args: list[str]) -> tuple[dict, str]:
    """``lorakit train`` in this process (``args`` start with "train"): its summary.json and
    its stderr; fails the test on a non-zero exit code."""
    import json
    from pathlib import Path

    from lorakit.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    out = Path(next(a for a in args if a.startswith("output_dir="))[11:])
    return json.loads((out / "summary.json").read_text()), err


def killed_run(args: list[str], point: str):
    """``python -m lorakit ARGS`` in a new process that kills itself at ``point``
    (lorakit.faults, e.g. ``after-step:4``); returns the finished process."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1", LORAKIT_TEST_KILL_AT=point)
    r = subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode < 0, r.stderr[-2000:]  # killed, not finished or failed
    return r


def ddp_launch(n: int = 2) -> list[str]:
    """The command prefix of ``n`` gloo processes through accelerate's launcher (DDP on CPU),
    up to ``-m``; the caller adds ``lorakit train ...``."""
    import sys
    from pathlib import Path

    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed")
    return [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
    ]


def load_llama_cpp(llama_cpp, model_path, **kwargs):
    """``llama_cpp.Llama(model_path, ...)`` without the CPU's extra buffer types: on CPUs with
    AMX, llama.cpp's AMX matmul crashed in decode on quantized weights (Q8_0, Q4_1; seen with
    llama-cpp-python 0.3.36 on an Intel Xeon with AMX). ``Llama`` reads the defaults from the
    ``llama_cpp.llama_cpp`` module, so that is where they are patched, for the load only."""
    low = llama_cpp.llama_cpp
    fields = {f[0] for f in getattr(low.llama_model_params, "_fields_", [])}
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    if "use_extra_bufts" in fields:
        low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(model_path), **{"verbose": False, **kwargs})
    finally:
        low.llama_model_default_params = default
