"""Loading reads the weights once, in the compute dtype: a bf16 run never holds an fp32 copy,
and a 4-bit (QLoRA) base never exists whole in 16 bits.

Measured in a fresh process on the embedded model (SmolLM2-135M): the growth of the peak
resident set (VmHWM, reset after the imports and the one-time cache conversion) while
loading, against the model's bf16 weight bytes (~270 MB; an fp32 load was ~2x that).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, torch
from pathlib import Path
import lorakit as lk
from lorakit import models
from lorakit.config import AdapterConfig
from lorakit.training.runtime import peak_memory_mb

mode = sys.argv[1]
models.resolve_model_path("smollm2-135m", torch.bfloat16)  # the one-time conversion
cfg = AdapterConfig(method="lora", quantize="nf4")
if mode == "nf4":
    import bitsandbytes  # noqa: F401  (an import, not loading)
Path("/proc/self/clear_refs").write_text("5")
before = peak_memory_mb()
if mode == "bf16":
    model, _ = lk.load_model("smollm2-135m", dtype="bf16")
else:
    model, _ = models.load_quantized("smollm2-135m", cfg, dtype="bf16")
growth = peak_memory_mb() - before
n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"growth_mb": growth,
                  "quantized": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
                  "bf16_mb": n_params * 2 / 2**20 if mode == "bf16" else None}))
"""


def _measure(mode: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM")
def test_bf16_and_4bit_loads_stay_within_their_own_size():
    bf16 = _measure("bf16")
    weights = bf16["bf16_mb"]
    assert 250 < weights < 300  # SmolLM2-135M's bf16 weights, ~270 MB
    assert bf16["growth_mb"] <= 1.3 * weights, bf16
    nf4 = _measure("nf4")
    assert nf4["quantized"] == 210  # 30 layers x 7 linear kinds
    assert nf4["growth_mb"] < weights, nf4
