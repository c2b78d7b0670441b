"""Exact training memory: the bytes a run's state and one step's autograd graph hold.

Peak memory (the process's max RSS on CPU, the CUDA allocator's peak on GPU) is what a
machine needs, but it depends on the allocator, glibc's arenas and a library's scratch
buffers (bitsandbytes' CPU path dequantizes every 4-bit weight into a fresh buffer for each
matmul). The figures here depend only on the tensors, so two methods compared by them differ
by what the methods keep, nothing else:

- ``params_bytes``: every parameter and buffer of the model, each storage once (a tied
  embedding and output head once); a 4-bit weight as its packed codes plus every quantization
  statistic (:func:`lorakit.quant.weight_tensors`);
- ``grads_bytes``: the gradient of every trainable parameter after one backward pass;
- ``optimizer_bytes``: every tensor of the optimizer's state after one step (AdamW: both
  moments and the step count of each parameter);
- ``saved_bytes``: what autograd saves for backward during the forward pass of one
  micro-batch (``torch.autograd.graph.saved_tensors_hooks``), each storage once, the model's
  own parameters and buffers left out (they are counted above). With gradient checkpointing
  the recomputed activations are not held, so they are not counted.

The method is that of benchmarks/run.py's exact memory table (benchmarks/RESULTS.md), which
uses these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..quant import is_quantized, weight_tensors

MIB = 2**20
#: the summary.json fields of :func:`exact_memory`, in the order the compare table shows them
FIELDS = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_bytes")


def _key(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return (st.device, st.data_ptr())


def _add(seen: dict, t: torch.Tensor) -> None:
    if t.device.type != "meta":
        seen[_key(t)] = t.untyped_storage().nbytes()


class SavedBytes:
    """Bytes autograd keeps for backward inside the block, each storage counted once (q, k
    and v share their input); storages of ``exclude`` (the model's own parameters and
    buffers, counted as state instead) are left out. Exact and independent of the
    allocator."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.seen: dict[tuple, int] = {}
        # the tensors, not their storages' keys: a storage may change inside the block (a LoRA
        # layer folds W0 into its [W0; A] buffer at its first training forward), so the keys
        # are read when the count is
        self.exclude = list(exclude)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            self.seen[_key(t)] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        skip = {_key(t) for t in self.exclude if t.device.type != "meta"}
        return sum(n for k, n in self.seen.items() if k not in skip)

    @property
    def mib(self) -> float:
        return self.nbytes / MIB


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer, a 4-bit weight as its codes and statistics."""
    quantized = [m for m in model.modules() if is_quantized(m)]
    skip = {id(m.weight) for m in quantized}
    out = [t for m in quantized for t in weight_tensors(m)]
    out += [p for p in model.parameters() if id(p) not in skip]
    return out + list(model.buffers())


def params_bytes(model: nn.Module) -> int:
    seen: dict = {}
    for t in _model_tensors(model):
        _add(seen, t)
    return sum(seen.values())


def grads_bytes(model: nn.Module) -> int:
    seen: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            _add(seen, p.grad)
    return sum(seen.values())


def optimizer_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    seen: dict = {}
    for st in optimizer.state.values() if optimizer is not None else ():
        for v in st.values():
            if torch.is_tensor(v):
                _add(seen, v)
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters and buffers + gradients + optimizer state, in bytes (each storage once)."""
    return params_bytes(model) + grads_bytes(model) + optimizer_bytes(optimizer)


def exact_memory(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> dict:
    """The figures of the module docstring for one training step of ``model``: ``loss_fn()``
    computes the micro-batch's loss (under the run's autocast), ``make_optimizer(model)``
    builds the run's optimizer, here with every learning rate 0.

    The step leaves the weights as they were (AdamW with lr 0 adds exactly 0 and multiplies
    by exactly 1); the gradients and the optimizer state are dropped afterwards."""
    was_training = model.training
    model.train()
    optimizer = make_optimizer(model)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        with SavedBytes(exclude=_model_tensors(model)) as saved:
            loss_fn().backward()
        optimizer.step()
        out = {
            "params_bytes": params_bytes(model),
            "grads_bytes": grads_bytes(model),
            "optimizer_bytes": optimizer_bytes(optimizer),
            "saved_bytes": saved.nbytes,
        }
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        model.train(was_training)
    return out


def run_exact_memory(run) -> dict:
    """:func:`exact_memory` of a training run (``run``: the loop's ``Run``) after its
    training: the micro-batch is the first of the run's first optimizer step (the same rows
    for every method of a compare), the loss is the training loss (with the method's
    regularizer), under the run's autocast and gradient checkpointing setting, and the
    optimizer is the run's AdamW (LoRA+ groups included). Returns the byte counts and the
    batch's shape (``batch_examples``, ``batch_tokens``: padded length)."""
    from .evaluation import autocast_for
    from .optim import build_optimizer
    from .runtime import activation_checkpointing

    model, tc = run.model, run.cfg.train
    idx = run.sampler(run.train_examples).indices(0)
    rows = [run.train_examples[i] for i in idx[: tc.batch_size]]
    batch = run.collate(run.sequences(rows))

    def loss_fn() -> torch.Tensor:
        with autocast_for(model, run.dtype):
            s, _ = run.objective.micro_loss(run, model, model, rows)
        loss = s / max(1, run.objective.count(rows))
        reg = run.hooks.regularizer(model)  # outside autocast, as the training loop's
        return loss if reg is None else loss + reg

    with activation_checkpointing(model, tc.gradient_checkpointing):
        out = exact_memory(model, loss_fn, lambda m: build_optimizer(m, tc.lr, tc.weight_decay))
    return {**out, "batch_examples": len(rows), "batch_tokens": int(batch["input_ids"].shape[1])}


def total_mib(record: dict | None) -> float | None:
    """The sum of :data:`FIELDS` of a summary's ``exact_memory`` record, in MiB (None
    without one)."""
    if not record or any(record.get(k) is None for k in FIELDS):
        return None
    return sum(record[k] for k in FIELDS) / MIB
