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

#: the method every export is written as (``lorakit export``): plain LoRA, which PEFT, vLLM and
#: llama.cpp load
EXPORT_METHOD = "lora"

# Presets named after the seed document; each expands to a method plus common options.
# User-given values always win over the preset's. Keys of PRESET_META are not options:
# "compare" holds what ``lorakit compare`` gives the preset (key, value, source), like a
# method's ``compare_settings``; "compare_suite": "long" runs it on the long-context suite;
# "compare_equal" adds a compare row of the preset with ``keys`` at its method's values.
PRESETS: dict[str, dict[str, Any]] = {
    # QLoRA (Dettmers et al. 2023, artidoro/qlora qlora.py defaults): NF4 base, r 64, alpha 16,
    # every linear layer but the output head.
    "qlora": {
        "method": "lora",
        "quantize": "nf4",
        "r": 64,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": "all-linear",
        "compare": [
            ("train.lr", 2e-4, "Dettmers et al. 2023, App. B (models up to 13B)"),
            ("train.schedule", "constant", "artidoro/qlora: constant schedule"),
            ("train.max_grad_norm", 0.3, "artidoro/qlora: max_grad_norm 0.3"),
        ],
        # the memory claim is about the 4-bit base at equal adapter settings: compare
        # also runs the preset with these options at its method's (LoRA's) values
        "compare_equal": {
            "row": "qlora.lora-settings",
            "keys": ("r", "alpha", "dropout", "target_modules"),
        },
    },
    # LoRA+ (Hayou et al. 2024): B learns lambda times faster than A; PEFT's docs use 16.
    "lora+": {
        "method": "lora",
        "loraplus_ratio": 16.0,
        "compare": [
            (
                "train.lr",
                2e-4,
                (
                    "Hayou et al. 2024: lr is A's learning rate, "
                    "LoRA's; lambda = 2^4 for LLaMA fine-tuning"
                ),
            )
        ],
    },
    # LongLoRA (Chen et al. 2023): LoRA r 8 / alpha 16 on attention, embeddings and norms
    # trained whole, S2-Attn in training.
    "longlora": {
        "method": "lora",
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "trainable_modules": ["embeddings", "norms"],
        "s2_attn": True,
        "compare": [
            (
                "train.lr",
                2e-4,
                (
                    "LoRA's rate: LongLoRA's own 2e-5 (Chen et al. "
                    "2023) is for 7B-70B models over 1000 steps"
                ),
            ),
            ("train.schedule", "constant", "Chen et al. 2023: constant with warm-up"),
        ],
        "compare_suite": "long",
    },
}
PRESET_META = ("compare", "compare_suite", "compare_equal")


def preset_options(name: str) -> dict[str, Any]:
    """The adapter options preset ``name`` expands to (its ``method`` included)."""
    return {k: v for k, v in PRESETS[name].items() if k not in PRESET_META}


def register(name: str, module: str) -> None:
    """Add (or replace) a method: ``module`` is an importable module that defines ``METHOD``."""
    METHODS[name] = module


def unregister(name: str) -> None:
    """Remove a method :func:`register` added (a plugin's, a test's)."""
    METHODS.pop(name, None)


def get_method(name: str):
    """The :class:`~lorakit.adapters.base.Method` registered as ``name``."""
    if name not in METHODS:
        raise LorakitError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    method = importlib.import_module(METHODS[name]).METHOD
    if method.name != name:
        raise LorakitError(
            f"{METHODS[name]} declares method {method.name!r}, registered as {name!r}"
        )
    return method


def all_methods() -> list:
    return [get_method(n) for n in METHODS]


def describe() -> list[str]:
    """One line per method and preset (``lorakit methods``)."""
    lines = [f"{m.name:10s} {m.summary}" for m in all_methods()]
    for name, preset in PRESETS.items():
        opts = ", ".join(f"{k}={v}" for k, v in preset_options(name).items() if k != "method")
        lines.append(f"{name:10s} preset: {preset['method']} with {opts}")
    return lines
