"""How the processes of a run share the model: one process, DDP (a whole copy each) or FSDP2
(each process holds a 1/N shard of every weight).

# Note: FSDP2 in lorakit
``train.distributed: fsdp`` (or ``auto`` under ``accelerate launch`` with an FSDP config of
``fsdp_version: 2``) shards with ``torch.distributed.fsdp.fully_shard`` (Zhao et al. 2023,
"PyTorch FSDP"; the per-parameter DTensor engine torchtitan and torchtune use): each decoder
layer of the transformers model (its ``GradientCheckpointingLayer`` instances, or the classes
of accelerate's ``fsdp_transformer_layer_cls_to_wrap``) is one unit, frozen and trainable
parameters together, with the adapter layers inside the unit of the layer they wrap; the
rest (embeddings, final norm, output head) is the root unit. lorakit calls ``fully_shard``
itself rather than through ``Accelerator.prepare``: accelerate's FSDP path does not exist on
CPU (it turns the request into DDP without a word), and one code path on CPU and GPU is what
the tests here can vouch for. accelerate still launches the processes, forms the process
group, places devices and runs autocast; its FSDP config keys that lorakit reads are
``fsdp_version`` (2 only), ``fsdp_reshard_after_forward``, ``fsdp_cpu_ram_efficient_loading``
and ``fsdp_transformer_layer_cls_to_wrap``.

Loading (``sharded_loading``, accelerate's cpu_ram_efficient_loading, on by default): process
0 reads the weights; the others build the model on the meta device; after ``fully_shard``
every process receives its shards from process 0 (``set_model_state_dict`` with
``broadcast_from_rank0``), so host memory does not grow with the process count. A 4-bit
(QLoRA) base is loaded and quantized by every process instead (its quantization statistics
are not tensors that the state-dict broadcast carries), then sharded.

Numerics: the gradient of each unit is reduce-scattered with a mean over the processes, as
DDP's all-reduce is, so the loop's loss normalization (loop.py, Note: the loss is normalized
by the global token count) gives the same update under both. LoRA-drop's shared pairs, used
by layers of several units, stay whole on every process (``ignored_params``) and their
gradients are averaged here (:func:`sync_replicated_grads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LorakitError
from ..sharding import is_sharded, like, local, local_bytes
from .runtime import decoder_layers


@dataclass(frozen=True)
class Strategy:
    """What ran: ``name`` is "single", "ddp" or "fsdp"; ``processes`` the world size."""

    name: str
    processes: int
    reshard_after_forward: bool = True
    sharded_loading: bool = True
    wrap_classes: tuple[str, ...] = ()

    @property
    def fsdp(self) -> bool:
        return self.name == "fsdp"

    def as_dict(self) -> dict:
        return {"strategy": self.name, "processes": self.processes}


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() in ("1", "true", "yes")


def launcher_asks_fsdp() -> bool:
    """True when ``accelerate launch`` was given an FSDP config (ACCELERATE_USE_FSDP)."""
    return _env_flag("ACCELERATE_USE_FSDP", False)


def resolve_strategy(requested: str, processes: int) -> Strategy:
    """The strategy for ``train.distributed`` (auto | ddp | fsdp) and the launcher's request.

    auto: FSDP2 when the launcher was given an FSDP config, else DDP with several processes,
    else one process. Asking for FSDP and getting anything else is an error, never silent."""
    wants_fsdp = requested == "fsdp" or (requested == "auto" and launcher_asks_fsdp())
    if requested == "ddp" and launcher_asks_fsdp():
        raise LorakitError(
            "train.distributed=ddp, but accelerate was launched with an FSDP "
            "config; drop one of the two"
        )
    if not wants_fsdp:
        return Strategy("ddp" if processes > 1 else "single", processes)
    version = os.environ.get("FSDP_VERSION", "2")
    if launcher_asks_fsdp() and version != "2":
        raise LorakitError(
            f"accelerate's FSDP config asks for fsdp_version {version}; lorakit "
            "shards with FSDP2 only: set fsdp_version: 2"
        )
    if processes < 2:
        raise LorakitError(
            "train.distributed=fsdp shards the model over several processes, "
            "but this run has one; start it with `accelerate launch "
            "--num_processes N -m lorakit train ...` (or torchrun)"
        )
    wrap = tuple(
        c.strip()
        for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")
        if c.strip()
    )
    return Strategy(
        "fsdp",
        processes,
        reshard_after_forward=_env_flag("FSDP_RESHARD_AFTER_FORWARD", True),
        sharded_loading=_env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING", True),
        wrap_classes=wrap,
    )


def fsdp_units(model: nn.Module, strategy: Strategy) -> list[nn.Module]:
    """The modules that become FSDP units below the root: the decoder layers (or the classes
    the launcher named). A model with none cannot be sharded: one sentence."""
    if strategy.wrap_classes:
        units = [m for m in model.modules() if type(m).__name__ in strategy.wrap_classes]
        if not units:
            raise LorakitError(
                f"fsdp_transformer_layer_cls_to_wrap names "
                f"{', '.join(strategy.wrap_classes)}, but {type(model).__name__} "
                "has no module of that class"
            )
        return units
    units = decoder_layers(model)
    if not units:
        raise LorakitError(
            f"FSDP needs the model's decoder layers to shard, but "
            f"{type(model).__name__} has none that transformers marks as such; "
            "train it with train.distributed=ddp"
        )
    return units


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters used by modules of more than one decoder layer (LoRA-drop's shared pairs)."""
    owner: dict[int, int] = {}
    shared: dict[int, nn.Parameter] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            if owner.setdefault(id(p), i) != i:
                shared[id(p)] = p
    return list(shared.values())


def shard_model(
    model: nn.Module, strategy: Strategy, device: torch.device, state: dict | None = None
) -> nn.Module:
    """Apply ``fully_shard`` to each unit and the root. ``state``: with sharded loading, the
    full state dict and buffers of process 0 (``{"params": ..., "buffers": ...}``; None on the
    others, whose model is on the meta device); they are then broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if hasattr(m, "fold_a"):
            # FSDP2 swaps in, frees and re-allocates the unsharded weight's storage itself: W0
            # may not live in a LoRA layer's [W0; A] buffer (adapters/lora.py, Note: A folded
            # into the frozen GEMM)
            m.unfold()
            m.fold_a = False
    shared = shared_parameters(model)  # in model order: the same on every process
    ignored = set(shared)
    for unit in fsdp_units(model, strategy):
        fully_shard(
            unit,
            reshard_after_forward=strategy.reshard_after_forward,
            ignored_params=ignored or None,
        )
    # the root (embeddings, final norm, output head) stays gathered between forward and
    # backward: backward needs it first, and the fused loss reads the head after forward
    fully_shard(model, reshard_after_forward=False, ignored_params=ignored or None)
    meta = any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers())
    if strategy.sharded_loading and (meta or state is not None):
        if meta:
            # to_empty gives each module its own new Parameter: tie the shared ones again
            uses = [
                [(m, n) for m in model.modules() for n, q in m._parameters.items() if q is p]
                for p in shared
            ]
            model.to_empty(device=device)
            for places in uses:
                first = places[0][0]._parameters[places[0][1]]
                for m, n in places[1:]:
                    m._parameters[n] = first
            shared = [places[0][0]._parameters[places[0][1]] for places in uses]
        rank0 = dist.get_rank() == 0
        params = (state or {}).get("params", {}) if rank0 else {}
        set_model_state_dict(
            model, params, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        buffers = (state or {}).get("buffers", {}) if rank0 else {}
        for name, buf in model.named_buffers():
            if rank0:
                buf.copy_(buffers[name])
            dist.broadcast(buf, src=0)
        for p in shared:  # not part of any unit: whole on every process, from process 0
            with torch.no_grad():
                dist.broadcast(p.data, src=0)
    return model


def full_state(model: nn.Module) -> dict:
    """Process 0's state for :func:`shard_model`: parameters and buffers, whole."""
    return {
        "params": model.state_dict(),
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
    }


def sync_replicated_grads(model: nn.Module) -> None:
    """Average over the processes the gradients FSDP does not reduce: those of parameters
    kept whole on every process (LoRA-drop's shared pairs)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in model.parameters():
        if p.requires_grad and p.grad is not None and not is_sharded(p):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of ``model`` back in its sharded state.

    # Note: reshard before building the optimizer
    The root unit keeps its weights gathered from forward to backward
    (``reshard_after_forward=False``), and FSDP2 swaps the module's parameters between the
    sharded DTensors and the gathered tensors. A forward with no backward after it (the base
    model's evaluation, DPO's precomputed reference) leaves the root gathered: an optimizer
    built then holds the gathered tensors, which never receive the reduce-scattered
    gradients, so the root's trainable weights (full fine-tuning's embeddings and final norm,
    LongLoRA's trained embeddings and norms) silently stayed as they were."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded and whole parameters together (torch's
    ``clip_grad_norm_`` cannot mix DTensors and plain tensors in one call): the squares of
    each process's shards are summed over the processes, a whole gradient counts once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [local(g).float().pow(2).sum() for g in grads if is_sharded(g)]
    whole = [g.float().pow(2).sum() for g in grads if not is_sharded(g)]
    dev = local(grads[0]).device
    sq_sharded = torch.stack(sharded).sum() if sharded else torch.zeros((), device=dev)
    if sharded:
        dist.all_reduce(sq_sharded, op=dist.ReduceOp.SUM)
    total = (sq_sharded + (torch.stack(whole).sum() if whole else 0.0)).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coef.to(local(g).dtype))
    return total


def split_param_groups(groups: list[dict]) -> list[dict]:
    """Each optimizer parameter group split into its sharded and whole parameters: a fused
    or foreach optimizer kernel cannot take DTensors and plain tensors in one list."""
    out = []
    for g in groups:
        for want in (True, False):
            ps = [p for p in g["params"] if is_sharded(p) == want]
            if ps:
                out.append({**g, "params": ps})
    return out


@contextlib.contextmanager
def whole_parameters(model: nn.Module, trainable_only: bool = True) -> Iterator[bool]:
    """Within the block process 0's model holds whole (gathered, CPU) tensors in place of its
    shards, so code written for one process (saving an adapter, a method's summary) reads
    full values; yields whether this process is the one that holds them. Every process must
    enter the block (the gathers are collectives); the others keep their shards. Tensors are
    gathered one at a time, so the other processes never hold more than one whole tensor.
    A no-op for a model with no sharded parameter."""
    from ..adapters.base import AdapterLayer

    # what an adapter file holds: trainable weights and adapter layers' own (LoRA-FA's A)
    sharded = [
        (m, n, p)
        for m in model.modules()
        for n, p in m._parameters.items()
        if p is not None
        and is_sharded(p)
        and (p.requires_grad or not trainable_only or isinstance(m, AdapterLayer))
    ]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if not sharded:
        yield rank0
        return
    swapped: dict[int, nn.Parameter] = {}
    done: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module, name, p in sharded:
            if id(p) not in swapped:
                whole = p.detach().full_tensor().cpu()
                swapped[id(p)] = nn.Parameter(whole, requires_grad=p.requires_grad) if rank0 else p
            if rank0:
                module._parameters[name] = swapped[id(p)]
                done.append((module, name, p))
        yield rank0
    finally:
        for module, name, p in done:
            module._parameters[name] = p


def load_whole(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (the same on every process) into parameters that may be shards."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(values[name].to(p.dtype), p))


def process_bytes(model: nn.Module, optimizer=None) -> dict:
    """Bytes this process holds: parameters (frozen and trainable), gradients, optimizer
    state (its shards under FSDP)."""
    seen: set[int] = set()
    frozen = trainable = grads = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += local_bytes(p)
            # a gradient is allocated for every trainable parameter in training (set_to_none
            # frees it between steps), so count what a step holds
            grads += local_bytes(p)
        else:
            frozen += local_bytes(p)
    opt = 0
    if optimizer is not None:
        for st in optimizer.state.values():
            opt += sum(local_bytes(v) for v in st.values() if torch.is_tensor(v))
    return {
        "frozen_param_bytes": frozen,
        "trainable_param_bytes": trainable,
        "grad_bytes": grads,
        "optimizer_bytes": opt,
    }


def gather_objects(obj, world: int) -> list:
    """``obj`` of every process, in rank order (a list of one without a process group)."""
    if world == 1 or not dist.is_initialized():
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def any_process(flag: bool, device) -> bool:
    """True on every process when ``flag`` is True on any of them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def requires_gradient_sync(model: nn.Module, on: bool) -> None:
    """FSDP2: skip (False) or do (True) the gradient reduce-scatter of the next backward, for
    gradient accumulation (DDP's ``no_sync``)."""
    fn: Callable | None = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(on)


__all__ = [
    "Strategy",
    "resolve_strategy",
    "shard_model",
    "full_state",
    "whole_parameters",
    "load_whole",
    "process_bytes",
    "clip_grad_norm_",
    "split_param_groups",
    "sync_replicated_grads",
    "gather_objects",
    "any_process",
    "requires_gradient_sync",
    "fsdp_units",
]
