"""Evaluation: the loss, and generation metrics on answers generated to their end.

# Note: answers are generated until the model ends them
A generation metric is only as good as the answers it reads. Generation stops at the
tokenizer's EOS or the chat template's end-of-turn token (every id of the model's
``generation_config.eos_token_id``), never at a small fixed budget: the cap defaults to the
longest reference answer in tokens + 16 (at most 1024), so a right answer is never cut short.
An answer that still reaches the cap is *counted* as cut and reported ("3 of 100 answers were
cut at 40 tokens"), so a low score that comes from the cap cannot pass for a bad model.

Metrics (all computed together; ``eval.metric`` picks the headline):
- ``exact_match``: prediction == reference after stripping surrounding whitespace;
- ``normalized_match`` and ``f1``: the SQuAD v1.1 definitions (Rajpurkar et al. 2016,
  the official evaluation script): lower case, punctuation and the articles a/an/the removed,
  whitespace collapsed; F1 over the bag of normalized tokens.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import METRIC_NAMES
from ..files import file_errors, write_lines
from .batching import collate
from .data import Rows, encode, prompt_and_answer
from .eval_precision import evaluation_precision
from .number import number_score
from .tasks import get_task

#: default cap = longest reference + this margin, never above MAX_NEW_TOKENS_CAP
CAP_MARGIN = 16
MAX_NEW_TOKENS_CAP = 1024
#: files of a run folder that hold the answers behind the base and tuned metrics
PREDICTIONS = {"base": "base_predictions.jsonl", "tuned": "predictions.jsonl"}


# ---- scoring one answer --------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Token F1 of the normalized answers (SQuAD); two empty answers score 1."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


SCORERS = {
    "exact_match": exact_match_score,
    "normalized_match": normalized_match_score,
    "f1": f1_score,
    "number": number_score,
}
METRICS = tuple(SCORERS)
assert METRICS == METRIC_NAMES, "the config's metric names and the scorers must agree"


def score(prediction: str, reference: str) -> dict[str, float]:
    """Every metric of one answer."""
    return {name: fn(prediction, reference) for name, fn in SCORERS.items()}


# ---- the loss -----------------------------------------------------------------------------


def autocast_for(model: nn.Module, dtype: torch.dtype | None):
    """torch.autocast on the model's device for bf16/fp16, a no-op context for fp32."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


@torch.no_grad()
def loss_sums(
    model: nn.Module,
    examples: list[dict],
    pad_id: int,
    batch_size: int = 16,
    dtype: torch.dtype | None = None,
    progress: str | None = None,
    share: Share | None = None,
) -> list[tuple[float, int]]:
    """(sum of next-token losses, labelled tokens) of each batch of ``examples``
    (``batch_size=1``: of each example). Computed by the training loss
    (:func:`~lorakit.training.loss.loss_sum`): only labelled positions get logits, so a long
    prompt with a short answer costs one forward pass, not a sequence x vocabulary tensor."""
    from .loss import loss_sum  # loss imports data, which this module imports too

    share = share or ONE_PROCESS
    progress = progress if share.rank == 0 else None
    was_training = model.training
    model.eval()
    device = _device(model)
    starts = list(range(0, len(examples), batch_size))
    mine = share.batches(len(starts))
    results: dict[int, tuple[float, int]] = {}
    for k in _bar(mine, progress, len(mine)):
        i = starts[k if k is not None else 0]  # a repeat: any batch
        b = {k2: v.to(device) for k2, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast_for(model, dtype):
            loss, n = loss_sum(model, b)
        if k is not None:
            results[k] = (loss.item(), n)
    model.train(was_training)
    merged = share.gather(results)
    return [merged[k] for k in range(len(starts))]


def _device(model: nn.Module) -> torch.device:
    """Where the model computes (a sharded parameter's device is its shard's)."""
    return next(model.parameters()).device


def eval_loss(
    model: nn.Module,
    examples: list[dict],
    pad_id: int,
    batch_size: int = 16,
    dtype: torch.dtype | None = None,
    progress: str | None = None,
    share: Share | None = None,
) -> float:
    """Mean next-token loss over every labelled token of ``examples`` (token-weighted)."""
    sums = loss_sums(model, examples, pad_id, batch_size, dtype, progress, share)
    return sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))


def _bar(it, desc: str | None, n_batches: int):
    """A tqdm bar over this process's batches; silent when ``desc`` is None."""
    if desc is None:
        return it
    bar = tqdm(total=n_batches, desc=desc, unit="batch", dynamic_ncols=True, leave=False)

    def gen():
        try:
            for i in it:
                yield i
                bar.update(1)
        finally:
            bar.close()

    return gen()


# ---- several processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """This process's part of an evaluation: batch ``k`` of the one-process order goes to
    process ``k % world``, so every batch is the one a single process would form (the same
    figures, not just close ones). ``lockstep``: every process must run the model the same
    number of times (FSDP: each forward gathers weights from all of them), so a process with
    fewer batches runs a repeat of one and discards it, and generation keeps stepping until
    every process is done (transformers' ``synced_gpus``)."""

    rank: int = 0
    world: int = 1
    lockstep: bool = False

    def batches(self, n: int) -> list[int | None]:
        """The batch numbers this process runs (None: a repeat whose result is dropped)."""
        mine: list[int | None] = list(range(self.rank, n, self.world))
        if self.lockstep:
            mine += [None] * (-(-n // self.world) - len(mine))
        return mine

    def gather(self, results: dict) -> dict:
        """{batch number: result} of every process, merged (a collective when world > 1)."""
        if self.world == 1:
            return results
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, results)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged


ONE_PROCESS = Share()


# ---- generation ---------------------------------------------------------------------------


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's
    ``eos_token_id`` (a list for chat models: end-of-turn tokens such as ``<|im_end|>``)."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for v in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def default_max_new_tokens(tokenizer, references: list[str]) -> int:
    """The longest reference in tokens + CAP_MARGIN (room for the end-of-turn token and a
    little more), at most MAX_NEW_TOKENS_CAP."""
    longest = max(
        (len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0
    )
    return min(MAX_NEW_TOKENS_CAP, longest + CAP_MARGIN)


@dataclass
class Answer:
    text: str
    n_tokens: int
    cut: bool  # reached the cap without a stop token


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    progress: str | None = None,
    share: Share | None = None,
) -> list[Answer]:
    """Greedy answers to ``prompts``, each generated until a stop token or the cap.

    Batched with the KV cache; prompts are sorted by length so that a batch holds prompts of
    similar length (less left padding). Answers come back in the prompts' order."""
    share = share or ONE_PROCESS
    progress = progress if share.rank == 0 else None
    was_training = model.training
    model.eval()
    device = _device(model)
    stops = stop_token_ids(model, tokenizer)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    starts = list(range(0, len(order), batch_size))
    mine = share.batches(len(starts))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    found: dict[int, list[tuple[int, Answer]]] = {}
    try:
        for k in _bar(mine, progress, len(mine)):
            s = starts[k if k is not None else 0]  # a repeat: any batch
            idx = order[s : s + batch_size]
            enc = tokenizer(
                [prompts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            with autocast_for(model, dtype):
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops or None,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    **({"synced_gpus": True} if share.lockstep else {}),
                )
            if k is None:
                continue
            found[k] = []
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :].tolist()):
                end = next((j for j, t in enumerate(row) if t in stops), None)
                body = row if end is None else row[:end]
                found[k].append(
                    (
                        i,
                        Answer(
                            tokenizer.decode(body, skip_special_tokens=True),
                            len(body),
                            cut=end is None and len(row) >= max_new_tokens,
                        ),
                    )
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    answers: list[Answer | None] = [None] * len(prompts)
    for part in share.gather(found).values():
        for i, ans in part:
            answers[i] = ans
    return answers  # type: ignore[return-value]


@dataclass
class GenerationResult:
    """The metrics of greedy answers to some rows, with every prediction behind them."""

    metrics: dict[str, float]
    predictions: list[dict]
    max_new_tokens: int
    cut: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def cut_note(self) -> str | None:
        if not self.cut:
            return None
        return (
            f"{self.cut} of {len(self.predictions)} answers were cut at "
            f"{self.max_new_tokens} tokens"
        )

    def as_dict(self) -> dict:
        return {
            "examples": len(self.predictions),
            "max_new_tokens": self.max_new_tokens,
            "cut_answers": self.cut,
            "generation_s": round(self.seconds, 3),
            **({"cut_note": self.cut_note} if self.cut else {}),
        }


def generation_metrics(
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    fmt: str,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    dtype: torch.dtype | None = None,
    progress: str | None = None,
    share: Share | None = None,
) -> GenerationResult:
    """Generate an answer for each row (greedy, to its end) and score it against the row's
    reference with every metric in METRICS (means over the rows)."""
    pairs = [prompt_and_answer(r, fmt, tokenizer) for r in rows[:limit]]
    refs = [ref for _, ref in pairs]
    cap = max_new_tokens or default_max_new_tokens(tokenizer, refs)
    t0 = time.perf_counter()
    answers = generate_answers(
        model, tokenizer, [p for p, _ in pairs], cap, batch_size, dtype, progress, share
    )
    seconds = time.perf_counter() - t0
    preds = []
    for (prompt, ref), ans in zip(pairs, answers):
        preds.append(
            {
                "prompt": prompt,
                "reference": ref,
                "prediction": ans.text,
                **score(ans.text, ref),
                "tokens": ans.n_tokens,
                "cut": ans.cut,
            }
        )
    n = max(1, len(preds))
    metrics = {m: sum(p[m] for p in preds) / n for m in METRICS}
    return GenerationResult(metrics, preds, cap, sum(p["cut"] for p in preds), seconds)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def write_predictions(path: Path, predictions: list[dict]) -> None:
    """One JSON object per answer: prompt, reference, prediction, each metric, cut."""
    with file_errors("write", path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_lines(path, (json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))


# ---- a model's figures on a run's held-out rows --------------------------------------------


@dataclass
class HeldOut:
    """What a model is evaluated on: validation examples (encoded) and rows with references
    for the generation metrics, in the data's format."""

    valid_examples: list[dict]
    metric_rows: list[dict]
    fmt: str
    #: preference pairs (DPO data): their scores join the figures (dpo.pair_scores)
    pairs: list[dict] = field(default_factory=list)
    beta: float = 0.1  # DPO's β, for the rewards of the pairs

    @property
    def metric_fmt(self) -> str:
        """The format of ``metric_rows`` (a preference pair's prompt and chosen answer: chat)."""
        return "chat" if self.fmt == "preference" else self.fmt


def measure(
    model: nn.Module,
    tokenizer,
    heldout: HeldOut,
    ec,
    max_seq_len: int,
    dtype: torch.dtype | None,
    label: str,
    log=print,
    predictions: Path | None = None,
    share: Share | None = None,
) -> dict:
    """:func:`measure_in` in the evaluation's precision (``ec.precision``; fp32 by default:
    See Note: why evaluation is fp32, in eval_precision.py); ``dtype``: the run's. A sharded
    (FSDP) model is evaluated in the run's precision: its shards cannot change dtype."""
    precision = "train" if share is not None and share.lockstep else ec.precision
    with evaluation_precision(model, precision, dtype) as eval_dtype:
        return measure_in(
            model, tokenizer, heldout, ec, max_seq_len, eval_dtype, label, log, predictions, share
        )


def measure_in(
    model: nn.Module,
    tokenizer,
    heldout: HeldOut,
    ec,
    max_seq_len: int,
    dtype: torch.dtype | None,
    label: str,
    log=print,
    predictions: Path | None = None,
    share: Share | None = None,
) -> dict:
    """Validation loss (and perplexity for plain text), the forgetting loss on general text
    and the generation metrics (``ec``: the run's EvalConfig); every answer goes to
    ``predictions`` (JSON lines). The one function behind the base and tuned figures of
    ``lorakit train``, ``lorakit eval`` and ``lorakit compare``. With several processes
    (``share``) each computes its part and every process returns the whole figures; the
    first writes ``predictions``."""
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id
    out: dict = {}
    if heldout.valid_examples:
        out["valid_loss"] = eval_loss(
            model, heldout.valid_examples, pad, dtype=dtype, progress=f"{label}: loss", share=share
        )
        if heldout.fmt == "text":
            out["valid_perplexity"] = perplexity(out["valid_loss"])
    general = encode(
        Rows(get_task("general-text").rows("test"), [], "general-text"),
        tokenizer,
        "text",
        max_seq_len,
        train_on="all",
    )
    # per paragraph, so that a forgetting figure can carry its standard error
    per = loss_sums(model, general.examples, pad, batch_size=1, dtype=dtype, share=share)
    out["general_text_loss"] = sum(s for s, _ in per) / max(1, sum(n for _, n in per))
    out["general_text_losses"] = [s / max(1, n) for s, n in per]
    records: list[dict] = []
    if heldout.pairs:
        from .dpo import pair_scores

        figures, records = pair_scores(
            model, heldout.pairs, pad, heldout.beta, dtype=dtype, share=share
        )
        out.update(figures)
    if ec.metric and heldout.metric_rows:
        res = generation_metrics(
            model,
            tokenizer,
            heldout.metric_rows,
            heldout.metric_fmt,
            ec.limit,
            ec.batch_size,
            ec.max_new_tokens,
            dtype=dtype,
            progress=f"{label}: answers",
            share=share,
        )
        out.update(res.metrics)
        out["metric"] = ec.metric
        out["generation"] = res.as_dict()
        if res.cut_note:
            log(f"{label}: {res.cut_note} (raise eval.max_new_tokens to let them finish)")
        # a pair's line holds its scores and, for the first eval.limit pairs, the answer
        merged = [{**p, **r} for p, r in zip(res.predictions, records)]
        records = merged + records[len(merged) :] if records else res.predictions
    if records and predictions is not None and (share is None or share.rank == 0):
        write_predictions(predictions, records)
        out["predictions"] = predictions.name  # beside the run's other files
    out["eval_time_s"] = time.perf_counter() - t0
    log(
        f"{label}: "
        + ", ".join(
            f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float) and k != "eval_time_s"
        )
    )
    return out
