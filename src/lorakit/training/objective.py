"""What a training step minimizes: ``train.objective`` (``sft`` or ``dpo``).

An objective tells the one training loop (loop.py) what an example is made of, what the loss
of a step is divided by, and the loss of a micro-batch:

- ``sequences(example)``: the token sequences of an example (one row or packed sequence for
  SFT; the chosen and the rejected sequence of a DPO pair), for counting tokens;
- ``count(examples)``: the normalizer of a global batch (SFT: its trained tokens; DPO: its
  pairs; See Note: the loss is normalized by the global token count, in loop.py);
- ``micro_loss(run, ddp_model, model, examples)``: (the sum of the micro-batch's losses,
  the sums of the objective's ``metrics`` or None), with ``run.collate`` making the batch.

DPO lives in dpo.py; SFT is next-token cross-entropy on the labelled tokens (loss.py).
"""

from __future__ import annotations

from torch import nn

from .data import IGNORE
from .loss import loss_sum


class SFTObjective:
    """Supervised fine-tuning: next-token cross-entropy on the labelled tokens."""

    name = "sft"
    metrics: tuple[str, ...] = ()

    @staticmethod
    def sequences(example: dict) -> list[dict]:
        return [example]

    @staticmethod
    def count(examples: list[dict]) -> int:
        return sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)

    def micro_loss(self, run, ddp_model: nn.Module, model: nn.Module, examples: list[dict]):
        batch = {k: v.to(run.accelerator.device) for k, v in run.collate(examples).items()}
        s, _ = loss_sum(ddp_model, batch, model)
        return s, None


def make_objective(cfg):
    """The objective of a run's config."""
    if cfg.train.objective == "dpo":
        from .dpo import DPOObjective

        return DPOObjective(cfg.dpo)
    return SFTObjective()
