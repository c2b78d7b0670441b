"""Walking and editing a model's module tree: the helpers inject, quant, the adapter layers
and S2-Attn share (GPT-2's Conv1D, the output and input embeddings, replacing a submodule)."""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (transformers.pytorch_utils), weight stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The output head (``get_output_embeddings``), if the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The name of ``module`` within ``model`` (None if absent)."""
    if module is None:
        return None
    for n, m in model.named_modules():
        if m is module:
            return n
    return None
