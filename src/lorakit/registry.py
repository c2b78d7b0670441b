"""THE list of methods, and the presets named after the papers.

Adding a method is one module under ``adapters/`` that declares ``METHOD`` (a
:class:`~lorakit.adapters.base.Method`: its layers, options, PEFT mapping, training hooks and
report notes) and one row in :data:`METHODS`. Nothing else in lorakit names a method: the
config, the adapter files, the training loop, compare, the report and inspect ask the
registry. Modules are imported by path on first use, so an unused method costs nothing at
start-up, and a plugin can :func:`register` a module of its own.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import LorakitError

#: method name -> module that declares ``METHOD``
METHODS: dict[str, str] = {
    "lora": "lorakit.adapters.lora",
    "dora": "lorakit.adapters.dora",
    "lora-fa": "lorakit.adapters.lora_fa",
    "adalora": "lorakit.adapters.adalora",
    "lora-drop": "lorakit.adapters.lora_drop",
    "full": "lorakit.adapters.full",
}

#: what ``adapter.method`` is when a config does not say
DEFAULT_METHOD = "lora"

# Presets named after the seed document; each expands to a method plus common options.
# User-given values always win over the preset's.
PRESETS: dict[str, dict[str, Any]] = {
    # QLoRA (Dettmers et al. 2023, artidoro/qlora qlora.py defaults): NF4 base, r 64, alpha 16,
    # every linear layer but the output head.
    "qlora": {"method": "lora", "quantize": "nf4", "r": 64, "alpha": 16, "dropout": 0.05,
              "target_modules": "all-linear"},
    # LoRA+ (Hayou et al. 2024): B learns lambda times faster than A; PEFT's docs use 16.
    "lora+": {"method": "lora", "loraplus_ratio": 16.0},
    # LongLoRA (Chen et al. 2023): LoRA r 8 / alpha 16 on attention, embeddings and norms
    # trained whole, S2-Attn in training.
    "longlora": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "trainable_modules": ["embeddings", "norms"], "s2_attn": True},
}


def register(name: str, module: str) -> None:
    """Add (or replace) a method: ``module`` is an importable module that defines ``METHOD``."""
    METHODS[name] = module


def get_method(name: str):
    """The :class:`~lorakit.adapters.base.Method` registered as ``name``."""
    if name not in METHODS:
        raise LorakitError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    method = importlib.import_module(METHODS[name]).METHOD
    if method.name != name:
        raise LorakitError(f"{METHODS[name]} declares method {method.name!r}, registered as "
                           f"{name!r}")
    return method


def all_methods() -> list:
    return [get_method(n) for n in METHODS]


def describe() -> list[str]:
    """One line per method and preset (``lorakit methods``)."""
    lines = [f"{m.name:10s} {m.summary}" for m in all_methods()]
    for name, preset in PRESETS.items():
        opts = ", ".join(f"{k}={v}" for k, v in preset.items() if k != "method")
        lines.append(f"{name:10s} preset: {preset['method']} with {opts}")
    return lines
