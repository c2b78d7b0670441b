"""Where and how a run computes: the accelerator (devices, processes, mixed precision), the
compute dtype, frozen weights stored in it, activation checkpointing, peak memory."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from ..errors import LorakitError
from ..models import resolve_dtype


def resolve_precision(precision: str) -> torch.dtype:
    """auto: bf16 on a GPU that has it or a CPU with native bf16 matmuls, else fp32."""
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        fast = getattr(torch.backends.mkldnn, "is_available", lambda: False)() and getattr(
            torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if fast else torch.float32
    return resolve_dtype(precision)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: ``train.report_to`` tracker -> (the module it needs, the pip requirement that brings it)
TRACKERS = {"tensorboard": ("tensorboard", "lorakit[tensorboard]"), "wandb": ("wandb", "wandb")}


def make_accelerator(dtype: torch.dtype, report_to: tuple[str, ...] = (),
                     out_dir: Optional[Path] = None) -> Accelerator:
    """An Accelerator for this process. On a machine without CUDA ``cpu=True`` makes
    accelerate form a gloo group (MULTI_CPU) when launched with several processes, instead of
    silently running each one alone. ``report_to``: accelerate's experiment trackers, their
    files under ``out_dir``; a tracker whose package is missing is an error here, before the
    run writes anything."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise LorakitError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    for name in report_to:
        module, req = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise LorakitError(f"train.report_to: {name} needs the {module} package, which is "
                               f"not installed (pip install '{req}')")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one global state per process; a second in-process run (a notebook,
        # the test suite) may ask for another precision
        AcceleratorState._reset_state(reset_partial_state=True)
    trackers = {"log_with": list(report_to), "project_dir": str(out_dir)} if report_to else {}
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision={torch.float32: "no", torch.bfloat16: "bf16",
                                        torch.float16: "fp16"}[dtype], **trackers)


def tracker_config(cfg_dict: dict, prefix: str = "") -> dict:
    """The run config flattened to dotted scalars, as trackers' hyper-parameter tables take."""
    out: dict = {}
    for k, v in cfg_dict.items():
        if isinstance(v, dict):
            out.update(tracker_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen floating-point weights in the compute dtype (trainables stay fp32)."""
    if dtype == torch.float32:
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """Recompute activations in backward within the block (transformers' non-reentrant
    checkpointing; ``activation_checkpointing_*`` where transformers has the new name)."""
    if not enabled:
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        off = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        off = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        off()


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
