"""Method name -> layer classes and training hooks.

Adding a method is one file under ``adapters/`` and one entry here. Classes are named by
import path and loaded on first use, so an unused method costs nothing at import time.

A method's *hooks* object (optional) lets the training loop drive method-specific work
without an if-chain: ``regularizer(model) -> loss | None`` (added to the loss),
``after_optimizer_step(model, step, total_steps)`` (AdaLoRA's rank allocator) and
``prepare(run)`` (LoRA-drop's importance phase). See ``train.py``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from .config import PRESETS


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    linear: Optional[str]  # "module:Class" for linear-like layers (None: no layer, e.g. full)
    embedding: Optional[str] = None  # "module:Class" for nn.Embedding, if supported
    peft_type: str = "LORA"
    hooks: Optional[str] = None

    def layer_class(self, kind: str):
        path = self.linear if kind == "linear" else self.embedding
        return _load(path) if path else None

    def hooks_object(self):
        return _load(self.hooks)() if self.hooks else None


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_A = "lorakit.adapters."
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("lora", "LoRA: frozen base + trainable low-rank B·A bypass (Hu et al. 2021)",
           _A + "lora:LoRALinear", _A + "lora:LoRAEmbedding"),
    Method("dora", "DoRA: magnitude m and direction (W0+sBA)/||.|| (Liu et al. 2024)",
           _A + "dora:DoRALinear"),
    Method("lora-fa", "LoRA-FA: A frozen, only B trains; saves x·Aᵀ, not x (Zhang et al. 2023)",
           _A + "lora_fa:LoRAFALinear"),
    Method("adalora", "AdaLoRA: SVD-form adapters, rank budget moves to important matrices "
           "(Zhang et al. 2023)", _A + "adalora:AdaLoRALinear", peft_type="ADALORA",
           hooks=_A + "adalora:AdaLoRAHooks"),
    Method("lora-drop", "LoRA-drop: LoRA on the layers whose output matters, the rest share one "
           "(Zhou et al. 2024)", _A + "lora:LoRALinear", _A + "lora:LoRAEmbedding",
           hooks=_A + "lora_drop:LoRADropHooks"),
    Method("full", "Full fine-tuning: every weight trains (the baseline)", None),
]}


def get_method(name: str) -> Method:
    from .errors import LorakitError

    if name not in METHODS:
        raise LorakitError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def describe() -> list[str]:
    """One line per method and preset (``lorakit methods``)."""
    lines = [f"{m.name:10s} {m.summary}" for m in METHODS.values()]
    for name, preset in PRESETS.items():
        opts = ", ".join(f"{k}={v}" for k, v in preset.items() if k != "method")
        lines.append(f"{name:10s} preset: {preset['method']} with {opts}")
    return lines
