"""Full fine-tuning: every weight of the model trains. The baseline the LoRA family is
measured against (memory, speed, quality, forgetting; docs/compare.md).

Nothing is wrapped, so there is no adapter to save: the result is a whole model folder
(``save_pretrained``), and the base model cannot be recovered from the trained one, which is
why the training loop measures the base before applying this method."""

from __future__ import annotations

from .base import Method, Setting


class Full(Method):
    name = "full"
    summary = "Full fine-tuning: every weight trains (the baseline)"
    wraps_layers = False
    dm_dd_figure = True
    compare_settings = (
        Setting(
            "train.lr",
            2e-5,
            "full fine-tuning of LLMs: 1e-5 to 2e-5 (Alpaca; Biderman et "
            "al. 2024, LoRA Learns Less and Forgets Less)",
        ),
        Setting("train.weight_decay", 0.0, "as the adapters (no decay)"),
    )


METHOD = Full()
