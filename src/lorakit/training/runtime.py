"""Where and how a run computes: the accelerator (devices, processes, mixed precision), the
compute dtype, frozen weights stored in it, activation checkpointing, compiled decoder layers,
peak memory."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from ..adapters.base import AdapterLayer
from ..errors import LorakitError
from ..faults import compile_backend
from ..models import resolve_dtype
from ..quant import native_bf16


def resolve_precision(precision: str) -> torch.dtype:
    """auto: bf16 on a GPU that has it natively (compute capability 8.0 and later: A100,
    H100, RTX 30xx...; not the emulated bf16 of a T4 or V100) or a CPU with native bf16
    matmuls, else fp32. An fp32 run on CUDA lets matmuls use TF32 (torch's "high"
    precision), as transformers' Trainer does with ``tf32=True``."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return resolve_dtype(precision)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: ``train.report_to`` tracker -> (the module it needs, the pip requirement that brings it)
TRACKERS = {"tensorboard": ("tensorboard", "lorakit[tensorboard]"), "wandb": ("wandb", "wandb")}


def make_accelerator(
    dtype: torch.dtype, report_to: tuple[str, ...] = (), out_dir: Path | None = None
) -> Accelerator:
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
            raise LorakitError(
                f"train.report_to: {name} needs the {module} package, which is "
                f"not installed (pip install '{req}')"
            )
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one global state per process; a second in-process run (a notebook,
        # the test suite) may ask for another precision
        AcceleratorState._reset_state(reset_partial_state=True)
    trackers = {"log_with": list(report_to), "project_dir": str(out_dir)} if report_to else {}
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision={torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
        **trackers,
    )


def tracker_config(cfg_dict: dict, prefix: str = "") -> dict:
    """The run config flattened to dotted scalars, as trackers' hyper-parameter tables take."""
    out: dict = {}
    for k, v in cfg_dict.items():
        if isinstance(v, dict):
            out.update(tracker_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def cast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Trainable floating-point weights as ``dtype`` master weights (a module trained whole,
    copied from a bf16 base, becomes fp32)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen floating-point weights in the compute dtype (trainables stay fp32)."""
    if dtype == torch.float32:
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
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


# Note: compiling the decoder layers
# ``train.compile`` compiles each decoder layer on its own (torchtune's per-layer compile,
# ``training.compile_model``), not the whole model: the layers of a model share one class and
# one structure, so with inductor's inlining of nn.Modules (parameters are graph inputs) one
# compiled graph serves all of them and compile time does not grow with depth. The loss stays
# eager: the fused output projection + cross-entropy (loss.py) picks labelled positions, a
# data-dependent shape. ``dynamic=True`` marks sizes symbolic from the first call, so batches
# of other lengths reuse the graph instead of recompiling. Graphs: the first layer (its input
# does not need a gradient), the others, and the no-grad graph of validation in training.
# Inductor compiles C++ on CPU (a C++ compiler must be installed) and Triton on CUDA; where
# compiling fails, the loop warns once and goes on eagerly (:func:`is_compile_error`).


#: torch.compile's backend (a test swaps in one that fails)
COMPILE_BACKEND = "inductor"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a transformers model (its
    ``GradientCheckpointingLayer`` instances: LlamaDecoderLayer, GPT2Block, ...)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def compiled_layers(model: nn.Module, enabled: bool, log=print):
    """Within the block each decoder layer runs through ``torch.compile`` (See Note: compiling
    the decoder layers); afterwards the layers are plain modules again (generation and
    evaluation stay eager)."""
    import torch._dynamo

    layers = decoder_layers(model) if enabled else []
    if enabled and not layers:
        log("warning: train.compile: no decoder layers found in this model; training eagerly")
    try:
        for layer in layers:
            for m in layer.modules():
                if isinstance(m, AdapterLayer):
                    m.before_compile()
            layer.compile(backend=compile_backend(COMPILE_BACKEND), dynamic=True)
    except RuntimeError as exc:  # torch.compile unsupported here (platform, Python version)
        log(f"warning: train.compile failed ({compile_error_reason(exc)}); training eagerly")
        uncompile(layers)
        layers = []
    # data-dependent sizes (DoRA's rows lost to cancellation) stay inside the graph; room for
    # more graphs of the one layer code than torch's default 8 (several models or runs in one
    # process: past the limit torch would run eagerly without a word)
    patch = (
        torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, recompile_limit=64)
        if layers
        else contextlib.nullcontext()
    )
    try:
        with patch:
            yield layers
    finally:
        uncompile(layers)


def uncompile(layers: list[nn.Module]) -> None:
    for layer in layers:
        # what nn.Module.compile set, without Module.__setattr__ (this may run while the
        # interpreter shuts down, for a model still compiled then)
        layer.__dict__["_compiled_call_impl"] = None


# Note: train.compile: auto
# Compiling pays back when the steps left, times what each step saves, exceed the one-time
# compile. What a step saves is a fraction of the eager step, measured per device and compute
# dtype by benchmarks/compile_breakeven.py (embedded SmolLM2-135M, LoRA r=16 on all linear
# layers; benchmarks/RESULTS.md); the eager step time is the run's own, the median of its
# first AUTO_PROBE_STEPS steps but the first (which pays one-time costs). Where nothing was
# measured (CUDA so far), or with several processes (a compile failure there cannot fall back
# to eager on one process alone), auto stays eager. The decision is logged with its figures.

#: eager steps timed before ``train.compile: auto`` decides
AUTO_PROBE_STEPS = 4
#: (device type, compute dtype) -> (the compiled step's time saved, as a fraction of the eager
#: step; the compile's one-time cost in seconds): benchmarks/compile_breakeven.py
#: fp32: measured on an AMD EPYC (AVX2), 30 steps: the compiled step 4% slower, 64.5 s of
#: compiling. bf16: measured on an AMD EPYC with AVX-512 BF16, 30 steps: 0.599 s compiled vs
#: 0.678 s eager (11.7% saved), 41.1 s of compiling (incl. the recompile for the first batch
#: without padding, which transformers runs without an attention mask).
COMPILE_MEASURED: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    ("cpu", torch.float32): (-0.04, 64.5),
    ("cpu", torch.bfloat16): (0.117, 41.1),
}


def compile_decision(
    device: torch.device,
    dtype: torch.dtype,
    processes: int,
    step_s: float | None = None,
    steps_left: int = 0,
) -> tuple[bool | None, str]:
    """``train.compile: auto``: (compile?, why); ``None`` while the eager probe steps are
    still to be timed (See Note: train.compile: auto)."""
    if processes > 1:
        return False, f"{processes} processes: a failed compile cannot fall back to eager"
    measured = COMPILE_MEASURED.get((device.type, dtype))
    if measured is None:
        return False, f"not measured on {device.type} in {dtype_name(dtype)}"
    if device.type == "cpu" and not _has_cpp_compiler():
        return False, "no C++ compiler for inductor on this machine"
    saved_frac, cost_s = measured
    if saved_frac <= 0:
        return False, (
            f"on {device.type} in {dtype_name(dtype)} the compiled step was measured "
            f"{-saved_frac:.0%} slower than eager"
        )
    if step_s is None:
        return None, ""
    gain_s = saved_frac * step_s * steps_left
    on = gain_s > cost_s
    return on, (
        f"{steps_left} steps left x {step_s:.3f} s x {saved_frac:.0%} saved = "
        f"{gain_s:.0f} s {'>' if on else '<='} ~{cost_s:.0f} s of compiling"
    )


def _has_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False
    return True


def is_compile_error(exc: BaseException) -> bool:
    """True for a failure of torch.compile itself (tracing, inductor, the C++/Triton
    compiler), as opposed to an error of the model's own code."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError
    from torch._inductor.exc import InductorError

    return isinstance(exc, (BackendCompilerFailed, InternalTorchDynamoError, InductorError))


def compile_error_reason(exc: BaseException) -> str:
    """The root cause of a compile failure, on one line (dynamo wraps the backend's error)."""
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


class PeakMemory:
    """Peak memory per phase of a run (load, base_eval, train, tuned_eval), in MiB: the CUDA
    allocator's peak on GPU, the peak resident set (VmHWM) on CPU. :meth:`reset` starts a new
    phase's peak (``torch.cuda.reset_peak_memory_stats``; on Linux, writing 5 to
    ``/proc/self/clear_refs`` resets VmHWM to the current RSS); :meth:`phase` records it."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux, or not allowed: the peak then covers the earlier phases too

    def phase(self, name: str) -> float:
        self.phases[name] = round(peak_memory_mb(), 1)
        self.reset()
        return self.phases[name]

    def overall(self) -> float:
        """The training phase's peak (what the memory figures of compare are about)."""
        return self.phases.get("train", max(self.phases.values(), default=0.0))


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
