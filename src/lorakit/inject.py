"""Find the target modules, wrap them in adapter layers, freeze everything else.

This is the one place that decides what trains: adapter parameters, modules trained whole
(``trainable_modules``, PEFT's ``modules_to_save``), or everything (a method that wraps no
layers: full fine-tuning). Which layer class wraps a target is the method's choice
(:meth:`Method.make_layer`), and so is what follows the wrapping (:meth:`Method.after_apply`).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator

import torch
from torch import nn

from .adapters.base import (  # noqa: F401
    AdapterLayer,
    LorakitState,
    adapter_layers,
    pattern_value,  # re-exported: part of inject's API
    state_of,
)
from .attention.s2 import configure_long_context, disable_s2_attention
from .config import AdapterConfig, adapter_config
from .errors import LorakitError
from .module_tree import input_embeddings, is_linear, module_name, output_layer, set_submodule
from .quant import quantize_model
from .registry import get_method


class TrainedModule(nn.Module):
    """A module trained whole (PEFT's ``ModulesToSaveWrapper``): a trainable copy beside the
    frozen original, so :func:`disabled` still gives the base model and a weight tied to
    another module (tied embeddings) is untied exactly as PEFT does."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.module = copy.deepcopy(original)
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disabled else self.module)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def _kind(module: nn.Module) -> str | None:
    if is_linear(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def name_matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a list matches a name equal to an entry or ending in '.' + entry;
    a string is a full regex match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules ``target_modules`` selects (PEFT semantics, "all-linear")."""
    modules = dict(model.named_modules())
    if target_modules == "all-linear":
        out_name = module_name(model, output_layer(model))
        names = [n for n, m in modules.items() if is_linear(m) and n != out_name]
    else:
        names = [n for n in modules if n and name_matches(n, target_modules)]
        bad = [n for n in names if _kind(modules[n]) is None]
        if bad:
            raise LorakitError(
                f"adapter.target_modules selects {bad[0]!r}, a {type(modules[bad[0]]).__name__}; "
                "only linear, Conv1D and embedding layers can be adapted"
            )
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _kind(m)})
        raise LorakitError(
            f"adapter.target_modules {target_modules!r} matches no module of this "
            f"model; its linear/embedding layers are named: {', '.join(leaves)}"
        )
    return names


def _find_trainable(model: nn.Module, entries: list[str]) -> list[str]:
    found: list[str] = []
    emb = module_name(model, input_embeddings(model))
    for entry in entries:
        if entry == "embeddings":
            hits = [emb] if emb else []
        elif entry == "norms":
            hits = [
                n
                for n, m in model.named_modules()
                if n and "norm" in type(m).__name__.lower() and any(True for _ in m.parameters())
            ]
        else:
            hits = [n for n, _ in model.named_modules() if n and name_matches(n, [entry])]
        if not hits:
            raise LorakitError(
                f"adapter.trainable_modules entry {entry!r} matches no module of this model"
            )
        found += [h for h in hits if h not in found]
    # a module inside another selected one is covered by its parent
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def apply(model: nn.Module, cfg: AdapterConfig | dict | None = None, **kwargs) -> nn.Module:
    """Wrap ``model``'s target layers in place with the configured adapter, freeze the rest.

    Returns the same model object, now carrying ``model.lorakit_state``. Accepts an
    :class:`AdapterConfig`, a dict, or keyword arguments (``apply(model, method="dora", r=8)``).
    """
    cfg = adapter_config(cfg, **kwargs)
    if getattr(model, "lorakit_state", None) is not None:
        raise LorakitError("this model already has a lorakit adapter")
    method = get_method(cfg.method)
    state = LorakitState(config=cfg)

    if cfg.quantize:
        quantize_model(model, cfg)  # not undone on a failure below (4-bit codes cannot be)
    trains = {id(p): (p, p.requires_grad) for p in model.parameters()}
    model.lorakit_state = state
    try:
        _wrap(model, method, cfg, state)
        method.after_apply(model, cfg)  # what the layers share, or a rewritten base
    except BaseException:
        # nothing half-applied: no wrapper, no state, S2-Attn off, each parameter trainable
        # as before (RoPE interpolation stays, as unload leaves it)
        unload(model, merge_adapters=False)
        for p, flag in trains.values():
            p.requires_grad_(flag)
        raise
    return model


def _wrap(model: nn.Module, method, cfg: AdapterConfig, state: LorakitState) -> None:
    """:func:`apply`'s freezing, wrapping and long-context set-up."""
    if not method.wraps_layers:  # full fine-tuning: everything trains, nothing is wrapped
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        targets = find_targets(model, cfg.target_modules)
        trainable = _find_trainable(model, cfg.trainable_modules)
        clash = sorted(set(targets) & set(trainable))
        if clash:
            raise LorakitError(
                f"module {clash[0]!r} is both an adapter target and in "
                "adapter.trainable_modules; choose one"
            )
        target_ids = {id(model.get_submodule(n)) for n in targets}
        outside = {
            id(p)
            for m in model.modules()
            if id(m) not in target_ids
            for p in m.parameters(recurse=False)
        }
        for name in targets:
            module = model.get_submodule(name)
            layer = method.make_layer(module, _kind(module), name, cfg)
            layer.train(module.training)  # a new module starts in train mode: keep the model's
            layer.tied_weight = id(getattr(module, "weight", None)) in outside
            set_submodule(model, name, layer)
        for name in trainable:
            set_submodule(model, name, TrainedModule(model.get_submodule(name)))
        state.targets, state.modules_to_save = targets, trainable

    if cfg.s2_attn or cfg.context_length:
        configure_long_context(model, cfg)


def trained_modules(model: nn.Module) -> Iterator[tuple[str, TrainedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, TrainedModule):
            yield name, module


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: Parameter} the optimizer should see; a shared Parameter appears once."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (idempotent, fp32 arithmetic)."""
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (idempotent)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model computes the base model's outputs."""
    layers = [m for _, m in adapter_layers(model)] + [m for _, m in trained_modules(model)]
    was_merged = [getattr(m, "merged", False) for m in layers]
    try:
        for m in layers:
            if isinstance(m, AdapterLayer):
                m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, merged in zip(layers, was_merged):
            m.disabled = False
            if merged:
                m.merge()


def unload(model: nn.Module, merge_adapters: bool = True) -> nn.Module:
    """Replace every wrapper by a plain module (merged when ``merge_adapters``): the result is
    an ordinary transformers model with no lorakit code in it."""
    for name, layer in list(adapter_layers(model)):
        if merge_adapters:
            layer.merge()
        if hasattr(layer, "unfold"):
            layer.unfold()  # W0 out of the [W0; A] training buffer (adapters/lora.py)
        set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(trained_modules(model)):
        set_submodule(model, name, wrapper.module if merge_adapters else wrapper.original_module)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False):
        # a trained copy of a tied embedding (TrainedModule) or a merged embedding LoRA now
        # differs from the output layer: the saved model must not tie them again
        inp = getattr(model, "get_input_embeddings", lambda: None)()
        outp = getattr(model, "get_output_embeddings", lambda: None)()
        if inp is not None and outp is not None and inp.weight is not outp.weight:
            cfg.tie_word_embeddings = False
    if hasattr(model, "lorakit_state"):
        if model.lorakit_state.config.s2_attn:
            disable_s2_attention(model)  # RoPE interpolation stays: the weights learned it
        del model.lorakit_state
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared Parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # packed 4-bit: 2 values per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
