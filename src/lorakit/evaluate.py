"""Loss and the task metric (exact match of the greedy answer) for a model on some rows."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .data import IGNORE, collate, prompt_and_answer


def autocast_for(model: nn.Module, dtype: Optional[torch.dtype]):
    """torch.autocast on the model's device for bf16/fp16, a no-op context for fp32."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 16,
              dtype: Optional[torch.dtype] = None) -> float:
    """Mean next-token loss over every labelled token of ``examples`` (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        with autocast_for(model, dtype):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                           labels.flatten(), ignore_index=IGNORE,
                                           reduction="sum")
        total += loss.item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                     batch_size: int = 32, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), decoded without specials."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with autocast_for(model, dtype):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def exact_match(model: nn.Module, tokenizer, rows: list[dict], fmt: str, limit: int = 200,
                batch_size: int = 32, max_new_tokens: int = 16,
                dtype: Optional[torch.dtype] = None) -> float:
    """Fraction of rows whose greedy answer equals the reference after stripping whitespace."""
    pairs = [prompt_and_answer(r, fmt, tokenizer) for r in rows[:limit]]
    answers = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens,
                               batch_size, dtype)
    hits = sum(a.strip() == ref.strip() for a, (_, ref) in zip(answers, pairs))
    return hits / max(1, len(pairs))
