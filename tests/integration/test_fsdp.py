"""FSDP2 on CPU: several gloo processes started as users start them (``accelerate launch``
with accelerate's FSDP config, fsdp_version 2), each holding a shard of every weight.

Compared in fp32 with one process at the same global batch (2 processes x batch 2 against
1 x 4): the loss curve within 1e-5 relative and every adapter tensor within 1e-5 absolute
(the only difference is the order of floating-point sums in the reduce-scatter; measured
~1e-7 and ~1e-8). In bf16, Adam's first steps turn rounding into large relative changes of a
zero-initialized B, so the comparison is made in fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = str(Path(sys.executable).parent / "accelerate")

FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
mixed_precision: 'no'
num_machines: 1
num_processes: {n}
use_cpu: true
"""

pytestmark = pytest.mark.skipif(
    not Path(LAUNCHER).exists(), reason="accelerate's launcher is not installed"
)

COMMON = (
    "eval.compare_base=false",
    "eval.limit=4",
    "eval.max_new_tokens=2",
    "train.max_steps=2",
    "train.save_every=0",
)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_one(model_dir, out: Path, *extra) -> subprocess.CompletedProcess:
    """One process at batch 4 (the reference)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            *tiny_run_args(model_dir, out, *COMMON, "train.batch_size=4", *extra),
        ],
        capture_output=True,
        text=True,
        env=_env(OMP_NUM_THREADS="2"),
        cwd=REPO,
        timeout=900,
        check=False,
    )


def run_fsdp(
    model_dir, out: Path, *extra, n: int = 2, batch: int = 2, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file fsdp.yaml`` with ``n`` processes at ``batch`` each."""
    cfg = out.parent / f"fsdp-{n}.yaml"
    cfg.write_text(FSDP_CONFIG.format(n=n))
    return subprocess.run(
        [
            LAUNCHER,
            "launch",
            "--config_file",
            str(cfg),
            "-m",
            "lorakit",
            "train",
            *tiny_run_args(model_dir, out, *COMMON, f"train.batch_size={batch}", *extra),
        ],
        capture_output=True,
        text=True,
        env=_env(**(env or {})),
        cwd=REPO,
        timeout=900,
        check=False,
    )


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_same_run(one: Path, two: Path) -> None:
    """Loss curves within 1e-5 relative, adapter files with the same tensors within 1e-5."""
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) > 0
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5, (a, b)
    name = "adapter_model.safetensors"
    if not (one / "adapter" / name).exists():
        name = "model.safetensors"  # full fine-tuning: a whole model folder
    ta, tb = (load_file(str(p / "adapter" / name)) for p in (one, two))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape, k  # saved whole, not one process's shard
        if ta[k].numel():
            assert (ta[k].float() - tb[k].float()).abs().max() <= 1e-5, k


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])


def test_fsdp_lora_matches_one_process_and_peft_loads_it(tiny_model_dir, tmp_path):
    from peft import PeftModel

    import lorakit as lk

    one, two = tmp_path / "one", tmp_path / "two"
    _ok(run_one(tiny_model_dir, one))
    r = run_fsdp(tiny_model_dir, two)
    _ok(r)
    assert "2 process(es), fsdp" in r.stderr
    assert r.stdout.count("adapter: ") == 1  # printed by the first process only
    assert_same_run(one, two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["distributed"] == {"strategy": "fsdp", "processes": 2}
    assert len(summary["process_bytes"]) == 2
    single = json.loads((one / "summary.json").read_text())
    assert single["distributed"] == {"strategy": "single", "processes": 1}
    # each process holds half of the frozen weights (the tiny model's dims are even)
    half = single["process_bytes"][0]["frozen_param_bytes"] / 2
    assert all(abs(p["frozen_param_bytes"] - half) <= 0.02 * half for p in summary["process_bytes"])
    # the evaluation was split over the processes and equals one process's
    for key in ("valid_loss", "general_text_loss", "exact_match"):
        assert summary["tuned"][key] == pytest.approx(single["tuned"][key], rel=1e-6, abs=1e-9)
    base, _ = lk.load_model(str(tiny_model_dir))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    theirs = PeftModel.from_pretrained(base, str(two / "adapter")).eval()
    ours = lk.load_adapter(lk.load_model(str(tiny_model_dir))[0], str(one / "adapter")).eval()
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(
            (
                "adapter.method=adalora",
                "adapter.adalora.init_r=6",
                "adapter.adalora.target_r=2",
                "adapter.adalora.tinit=0",
                "adapter.adalora.tfinal=0",
                "adapter.adalora.delta_t=1",
            ),
            id="adalora",
        ),
        pytest.param(("adapter.method=lora-drop",), id="lora-drop"),
        # bf16: FSDP runs the loss under autocast itself (the training loop), the others under
        # accelerate's forward wrapper; the regularizer stays fp32 in both. Slow: bf16 kernels
        # differ between CPU kinds, and the 1e-5 tolerance was only measured on an AVX-512 EPYC
        pytest.param(
            (
                "adapter.method=adalora",
                "adapter.adalora.init_r=6",
                "adapter.adalora.target_r=2",
                "adapter.adalora.tinit=0",
                "adapter.adalora.tfinal=0",
                "adapter.adalora.delta_t=1",
                "train.precision=bf16",
            ),
            id="adalora-bf16",
            marks=pytest.mark.slow,
        ),
        pytest.param(("adapter.method=dora",), id="dora", marks=pytest.mark.slow),
        pytest.param(("adapter.method=lora-fa",), id="lora-fa", marks=pytest.mark.slow),
        pytest.param(("adapter.method=lora+",), id="lora-plus", marks=pytest.mark.slow),
        pytest.param(("adapter.method=full",), id="full", marks=pytest.mark.slow),
        # the base model evaluated first (eval.compare_base, the default), then trained: the
        # root unit's trainable weights (embeddings, final norm) train too (See Note: reshard
        # before building the optimizer)
        pytest.param(
            ("adapter.method=full", "eval.compare_base=true"),
            id="full-after-base-eval",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ("adapter.method=longlora", "data.max_seq_len=64", "eval.compare_base=true"),
            id="longlora-after-base-eval",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ("adapter.method=longlora", "data.max_seq_len=64"),
            id="longlora",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ("train.gradient_checkpointing=true",), id="grad-ckpt", marks=pytest.mark.slow
        ),
        pytest.param(("train.compile=true",), id="compile", marks=pytest.mark.slow),
        # packed sequences over the epoch (data.packing: true; auto, the default, packs each
        # micro-batch in every case above): the loss keeps the global token count
        pytest.param(("data.packing=true",), id="packing-true", marks=pytest.mark.slow),
        # DPO (train.objective: dpo): the reference with the adapter off under FSDP, and full
        # fine-tuning's reference computed once before training by every process
        pytest.param(
            ("train.objective=dpo", "data.train=task:arithmetic-pref"),
            id="dpo",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ("train.objective=dpo", "data.train=task:arithmetic-pref", "adapter.method=full"),
            id="dpo-full",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ("data.packing=false", "data.group_by_length=true"),
            id="group-by-length",
            marks=pytest.mark.slow,
        ),
        # the 4-bit base: each process reads and quantizes it, the packed NF4 bytes are sharded
        pytest.param(
            ("adapter.quantize=nf4", "adapter.method=dora"), id="qlora-dora", marks=pytest.mark.slow
        ),
    ],
)
def test_every_method_under_fsdp_equals_one_process(tiny_model_dir, tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(run_one(tiny_model_dir, one, *extra))
    _ok(run_fsdp(tiny_model_dir, two, *extra))
    assert_same_run(one, two)
    a, b = (json.loads((p / "summary.json").read_text())["method_summary"] for p in (one, two))
    # AdaLoRA's kept ranks per layer, LoRA-drop's selection and sharing: identical; figures
    # such as LoRA-drop's importance within rounding
    assert _close(a, b), (a, b)


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return a == b


@pytest.mark.slow  # three runs, one killed and resumed
def test_fsdp_resume_after_a_kill_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    extra = (
        "train.max_steps=4",
        "train.save_every=2",
        "adapter.method=adalora",
        "adapter.adalora.init_r=6",
        "adapter.adalora.target_r=2",
        "adapter.adalora.tinit=0",
        "adapter.adalora.tfinal=1",
        "adapter.adalora.delta_t=1",
    )
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _ok(run_fsdp(tiny_model_dir, whole, *extra))
    r = run_fsdp(tiny_model_dir, cut, *extra, env={"LORAKIT_TEST_KILL_AT": "after-step:3"})
    assert r.returncode != 0 and not (cut / "summary.json").exists()
    _ok(run_fsdp(tiny_model_dir, cut, *extra, "train.resume=true"))
    assert_same_run(whole, cut)
    ckpt = sorted((cut / "checkpoints").iterdir())[-1]
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert "torch" in rng and "torch.rank1" in rng  # each process's own RNG state


@pytest.mark.slow  # four gloo processes
def test_four_processes_each_hold_a_quarter_of_the_frozen_weights(tiny_model_dir, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    _ok(run_one(tiny_model_dir, one))
    _ok(run_fsdp(tiny_model_dir, four, n=4, batch=1))
    whole = json.loads((one / "summary.json").read_text())["process_bytes"][0]
    parts = json.loads((four / "summary.json").read_text())["process_bytes"]
    assert len(parts) == 4
    for p in parts:
        assert p["frozen_param_bytes"] <= 0.3 * whole["frozen_param_bytes"]
        assert p["optimizer_bytes"] <= 0.3 * whole["optimizer_bytes"]
    assert_same_run(one, four)


def test_fsdp_that_cannot_be_had_is_one_sentence(tiny_model_dir, tmp_path):
    out = tmp_path / "alone"
    r = run_one(tiny_model_dir, out, "train.distributed=fsdp")
    assert r.returncode == 2
    assert "shards the model over several processes" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    out = tmp_path / "nothing-to-wrap"
    r = run_fsdp(tiny_model_dir, out, env={"FSDP_TRANSFORMER_CLS_TO_WRAP": "NoSuchLayer"})
    assert r.returncode != 0
    assert "has no module of that class" in r.stderr
    assert not out.exists()


def test_a_compile_failure_under_two_processes_ends_both_cleanly(tiny_model_dir, tmp_path):
    """No eager retry on one process while the other waits in a collective: every process
    stops with the one sentence, the launcher ends them all, nothing is left half-written."""
    out = tmp_path / "run"
    r = run_fsdp(
        tiny_model_dir, out, "train.compile=true", env={"LORAKIT_TEST_BROKEN_COMPILER": "1"}
    )
    assert r.returncode != 0
    assert "with several processes lorakit does not fall back" in r.stderr
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
