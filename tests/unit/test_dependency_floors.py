"""pyproject's floors are at least what the code calls, and the installed versions meet them.

What needs what (each checked against the installed library below):
- torch 2.7: ``torch.distributed.fsdp.fully_shard`` with ``ignored_params`` (FSDP2),
  ``distribute_tensor(..., src_data_rank=None)``, SDPA's ``enable_gqa`` (2.5) and
  ``torch._dynamo.config.recompile_limit`` (the name since 2.6), fused AdamW on CPU (2.4),
  per-device ``torch.is_autocast_enabled``/``get_autocast_dtype`` (2.4; the LoRA Function),
  the CPU flash attention op pair and ``torch._fused_sdp_choice`` (S2Function).
- bitsandbytes 0.49: NF4 ``Linear4bit`` quantized and run on the CPU.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
NEEDED = {"torch": "2.7", "bitsandbytes": "0.49", "transformers": "4.56", "accelerate": "1.0"}


def floors() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', block))


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_floor_covers_what_the_code_calls(package):
    declared = floors()
    assert package in declared, f"{package} has no floor in pyproject"
    assert Version(declared[package]) >= Version(NEEDED[package])
    assert Version(version(package).split("+")[0]) >= Version(declared[package])


def test_the_torch_features_behind_the_floor_exist():
    import torch
    import torch._dynamo
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    assert "ignored_params" in inspect.signature(fully_shard).parameters
    assert "src_data_rank" in inspect.signature(distribute_tensor).parameters
    assert hasattr(torch._dynamo.config, "recompile_limit")
    q = torch.zeros(1, 4, 2, 8)
    kv = torch.zeros(1, 2, 2, 8)
    torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert torch._fused_sdp_choice(q, kv, kv, enable_gqa=True) >= 0
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    assert torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
    assert not torch.is_autocast_enabled("cpu")
