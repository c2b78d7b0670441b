"""Direct Preference Optimization: one more loss the training loop runs (docs/preference.md).

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", arXiv 2305.18290) trains on pairs of completions of one prompt, ``chosen``
(preferred) and ``rejected``, against a frozen reference policy. With log-probabilities
``π`` of the trained model and ``π_ref`` of the reference, summed over each completion's
tokens, and ``Δ = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))``:

- ``sigmoid`` (the paper's loss): ``-log σ(β Δ)``;
- ``ipo`` (Azar et al. 2023, arXiv 2310.12036): ``(Δ' - 1/(2β))²``, Δ' with each log-ratio
  divided by its completion's token count (as TRL computes it);
- ``robust`` (Chowdhury et al. 2024, arXiv 2403.00409): ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) /
  (1-2ε)``, ε = ``dpo.label_smoothing``, the one loss of the three that reads it (as in TRL
  1.16, where sigmoid and ipo ignore it; lorakit refuses it with them instead);
- ``sft``: the mean negative log-likelihood of the chosen completions' tokens. Added to a
  preference loss (``dpo.loss: [sigmoid, sft]``, weighted by ``dpo.loss_weights``, as TRL
  combines its ``loss_type`` list) it is RPO (Pang et al. 2024, "Iterative Reasoning
  Preference Optimization", arXiv 2404.19733): it keeps the chosen answers likely while the
  margin grows, where plain DPO can lower both (the built-in task's figures in README).

The loss of a step is the mean over its pairs (the sum over each micro-batch divided by the
global batch's pair count: See Note: the loss is normalized by the global token count, in
loop.py), which is TRL's mean of micro-batch means when micro-batches hold as many pairs
(``sft``'s token mean is taken per micro-batch, as TRL takes it, and counted once per pair).
The implicit rewards ``β (log π - log π_ref)`` give the metrics TRL logs, under its names:
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (chosen > rejected, strictly),
``rewards/margins``, ``logps/chosen``, ``logps/rejected``.

# Note: the reference is the model with the adapter off
With an adapter, the reference policy is the same model with every adapter layer and trained
module disabled (``inject.disabled``): the frozen base weights, held once. Its
log-probabilities are computed on the same batch right after the policy's forward, under
no_grad, as TRL does with a PEFT model. Full fine-tuning has no adapter to switch off, so its
reference log-probabilities are computed once before training, from the initial weights, and
stored with the run (``reference_logps.safetensors``; ``dpo.precompute_ref_log_probs`` asks
for the same with an adapter): one forward per pair, no second copy of the model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import file_errors
from ..inject import adapter_layers, disabled, trained_modules
from .loss import sequence_logps

#: TRL's metric names, in the order they are logged
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
REFERENCE_FILE = "reference_logps.safetensors"


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each pair's loss (See the module docstring); the log-probabilities are (pairs,)."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if loss == "ipo":
        d = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2
    d = beta * (chosen - rejected)
    if loss == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)
    return -F.logsigmoid(d)


def pair_metric_sums(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The sums over the pairs of each of :data:`METRICS` (a (6,) tensor; divided by the
    pair count they are TRL's means)."""
    rc = beta * (policy_chosen - ref_chosen).detach()
    rr = beta * (policy_rejected - ref_rejected).detach()
    return torch.stack(
        [
            rc.sum(),
            rr.sum(),
            (rc > rr).float().sum(),
            (rc - rr).sum(),
            policy_chosen.detach().sum(),
            policy_rejected.detach().sum(),
        ]
    ).double()


def can_disable(model: nn.Module) -> bool:
    """True when the model has an adapter switched on, which the reference switches off."""
    layers = [m for _, m in adapter_layers(model)] + [m for _, m in trained_modules(model)]
    return any(not getattr(m, "disabled", False) for m in layers)


class DPOObjective:
    """DPO for the training loop: a micro-batch of pairs is one padded batch of their chosen
    then their rejected sequences (TRL's concatenated forward)."""

    name = "dpo"
    metrics = METRICS

    def __init__(self, cfg):
        self.cfg = cfg  # the run's DPOConfig

    @staticmethod
    def sequences(example: dict) -> list[dict]:
        return [example["chosen"], example["rejected"]]

    @staticmethod
    def count(examples: list[dict]) -> int:
        """What the loss of a step is divided by: its pairs."""
        return len(examples)

    def micro_loss(self, run, ddp_model: nn.Module, model: nn.Module, examples: list[dict]):
        """(the sum of the pairs' losses, the sums of :data:`METRICS`)."""
        n = len(examples)
        seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        batch = {k: v.to(run.accelerator.device) for k, v in run.collate(seqs).items()}
        policy = sequence_logps(ddp_model, batch, model)
        if "reference" in examples[0]:
            ref = torch.tensor(
                [e["reference"][0] for e in examples] + [e["reference"][1] for e in examples],
                dtype=policy.dtype,
                device=policy.device,
            )
        else:
            ref = reference_logps(model, batch)
        tokens = (batch["labels"] != -100).sum(1)
        c, r = policy[:n], policy[n:]
        rc, rr = ref[:n], ref[n:]
        dc, total = self.cfg, 0.0
        for name, weight in dc.terms:
            if name == "sft":  # TRL: the mean token NLL of the micro-batch's chosen completions
                part = -c.sum() / tokens[:n].sum().clamp(min=1) * n
            else:
                part = dpo_losses(
                    c, r, rc, rr, dc.beta, name, dc.label_smoothing, tokens[:n], tokens[n:]
                ).sum()
            total = total + weight * part
        return total, pair_metric_sums(c, r, rc, rr, dc.beta)


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """The reference policy's log-probabilities of ``batch``'s rows: the model with its adapter
    off (See Note: the reference is the model with the adapter off)."""
    with disabled(model):
        return sequence_logps(model, batch, model)


def precompute_reference(run, examples: list[dict], fingerprint: str) -> float:
    """Store each pair's reference log-probabilities in it (``example["reference"]``), computed
    once with the model as it is now (before training) or read back from the run folder when
    an earlier (interrupted) run of the same pairs stored them; returns the seconds spent."""
    path = Path(run.out_dir) / REFERENCE_FILE
    if path.exists():
        saved = load_file(str(path))
        if saved["fingerprint"].tolist() == list(fingerprint.encode()) and len(
            saved["logps"]
        ) == len(examples):
            for e, (c, r) in zip(examples, saved["logps"].tolist()):
                e["reference"] = (c, r)
            return 0.0
    t0 = time.perf_counter()
    model, bs = run.model, run.cfg.train.batch_size
    was_training = model.training
    model.train()  # the state training runs in (dropout is off for DPO: DPOConfig)
    off = can_disable(model)  # the adapter of a LoRA-drop sample phase, say, is switched off
    out = []
    try:
        for i in range(0, len(examples), bs):
            part = examples[i : i + bs]
            seqs = [e["chosen"] for e in part] + [e["rejected"] for e in part]
            batch = {k: v.to(run.accelerator.device) for k, v in run.collate(seqs).items()}
            with run.accelerator.autocast(), torch.no_grad():
                lp = reference_logps(model, batch) if off else sequence_logps(model, batch)
                lp = lp.double().cpu()
            out += list(zip(lp[: len(part)].tolist(), lp[len(part) :].tolist()))
    finally:
        model.train(was_training)
    for e, ref in zip(examples, out):
        e["reference"] = ref
    if run.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        with file_errors("write", path):
            save_file(
                {
                    "logps": torch.tensor(out, dtype=torch.float64),
                    "fingerprint": torch.tensor(list(fingerprint.encode()), dtype=torch.uint8),
                },
                str(tmp),
            )
            os.replace(tmp, path)
    return time.perf_counter() - t0


# ---- held-out pairs -------------------------------------------------------------------------


@torch.no_grad()
def pair_scores(
    model: nn.Module,
    pairs: list[dict],
    pad_id: int,
    beta: float,
    batch_size: int = 16,
    dtype: torch.dtype | None = None,
    share=None,
) -> tuple[dict, list[dict]]:
    """The held-out preference figures of ``pairs`` and each pair's scores.

    ``pref_accuracy``: the share of pairs whose chosen completion the model gives a higher
    log-probability than the rejected one, and ``pref_margin``, the mean difference; both need
    no reference, so a base, an SFT and a DPO model compare on them. With an adapter (the
    reference is the model with it off): ``reward_accuracy`` and ``reward_margin``, TRL's
    ``rewards/accuracies`` and ``rewards/margins`` on held-out pairs."""
    from .batching import collate
    from .evaluation import ONE_PROCESS, autocast_for

    share = share or ONE_PROCESS
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with_ref = can_disable(model)
    starts = list(range(0, len(pairs), batch_size))
    found: dict[int, list[list[float]]] = {}
    for k in share.batches(len(starts)):
        part = pairs[starts[k if k is not None else 0] :][:batch_size]
        seqs = [p["chosen"] for p in part] + [p["rejected"] for p in part]
        batch = {key: v.to(device) for key, v in collate(seqs, pad_id).items()}
        with autocast_for(model, dtype):
            lp = sequence_logps(model, batch).double()
            ref = reference_logps(model, batch).double() if with_ref else torch.zeros_like(lp)
        n = len(part)
        if k is not None:
            found[k] = torch.stack([lp[:n], lp[n:], ref[:n], ref[n:]], 1).tolist()
    model.train(was_training)
    rows = [r for k, part in sorted(share.gather(found).items()) for r in part]
    records = []
    for c, r, rc, rr in rows:
        rec = {"logp_chosen": c, "logp_rejected": r, "prefers_chosen": c > r}
        if with_ref:
            rec.update(
                ref_logp_chosen=rc,
                ref_logp_rejected=rr,
                reward_margin=beta * ((c - rc) - (r - rr)),
            )
        records.append(rec)
    n = max(1, len(records))
    metrics = {
        "pref_accuracy": sum(x["prefers_chosen"] for x in records) / n,
        "pref_margin": sum(x["logp_chosen"] - x["logp_rejected"] for x in records) / n,
    }
    if with_ref:
        metrics["reward_accuracy"] = sum(x["reward_margin"] > 0 for x in records) / n
        metrics["reward_margin"] = sum(x["reward_margin"] for x in records) / n
    return metrics, records
