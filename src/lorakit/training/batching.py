"""Examples -> micro-batches: packing, padding, length grouping, and the step sampler.

``data.packing`` decides how a run's encoded rows reach the model (docs/packing.md):

- ``false``: each row is one sequence; a micro-batch is right-padded to its longest row
  (``data.group_by_length: true`` puts rows of similar length in the same step, so less of
  it is padding);
- ``true``: the epoch's rows are packed whole, best-fit decreasing, into sequences of at
  most ``data.max_seq_len`` tokens, and ``train.batch_size`` counts those sequences (TRL's,
  LLaMA-Factory's and axolotl's convention: fewer, fuller steps per epoch); every row keeps
  its own positions and attends to itself only (See Note: packed sequences);
- ``auto`` (the default): where the model and method can keep packed rows apart
  (:func:`decide_layout`), the rows of each micro-batch are packed the same way (padding-free
  batches, as Unsloth's default and TRL's ``padding_free``): every step trains on exactly the
  rows it would unpacked, with the same loss, only with (almost) no padding; else ``false``;
- ``concat``: the rows' tokens are concatenated and cut into ``max_seq_len`` blocks (the
  convention for plain-text corpora: rows are cut across blocks and attend to the rows
  before them, their positions run on).

# Note: packed sequences
A packed sequence carries ``position_ids`` that restart at 0 at every row and no
``attention_mask``; transformers' mask builder (``masking_utils.create_causal_mask``, which
the Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3 ... models call) then finds the rows from the
positions (``find_packed_sequence_indices``) and builds a block-diagonal causal mask for eager
and SDPA attention, and flash-attention turns the same positions into ``cu_seqlens`` (varlen)
when the batch is one row. So lorakit writes no mask of its own: it gives the model the
positions, keeps ``use_cache=False`` in training (a cache disables the detection) and, for
flash attention, flattens the micro-batch into one row (:func:`collate` ``flat``). The
first label of every row is -100: it would be predicted from the previous row's last token,
which the row never sees unpacked. With that, a packed row's logits, loss and gradients are
those of the row alone (tests/numerics/test_packing.py checks every method in fp32).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import LorakitError
from .data import IGNORE

#: the attention implementations that keep packed rows apart, given positions that restart:
#: the mask-based ones build a block-diagonal mask, the flash ones use varlen over one row
MASKED_ATTENTION = ("eager", "sdpa")
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")

#: length grouping: rows are sorted by length within windows of this many global batches
#: (transformers' LengthGroupedSampler uses 50 batches)
GROUP_WINDOW = 50


@dataclass(frozen=True)
class Layout:
    """How the training rows become sequences: ``mode`` is what ran (``packed``, ``padded``
    or ``concat``), ``asked`` what ``data.packing`` said, ``why`` the reason in words;
    ``per_batch``: packed within each micro-batch (``auto``) rather than over the epoch
    (``true``); ``flat``: a packed micro-batch is one row (flash attention)."""

    mode: str
    asked: str
    why: str
    flat: bool = False
    per_batch: bool = False
    #: filled in by :meth:`counted`: rows, the sequences they became, and the share of the
    #: sequences' room (max_seq_len each) the rows fill
    rows: int = 0
    sequences: int = 0
    fill: float | None = None

    def counted(self, rows: int, sequences: int, tokens: int, max_len: int) -> Layout:
        """With ``rows`` examples as encoded, ``sequences`` as trained on, holding
        ``tokens`` tokens."""
        fill = tokens / (sequences * max_len) if sequences else None
        return replace(self, rows=rows, sequences=sequences, fill=fill)

    def describe(self) -> str:
        """One line for the log: what ran and why."""
        what = {
            "packed": (
                f"the rows of each micro-batch packed into sequences no longer than its "
                f"longest row ({self.rows} rows; each step trains on the rows it would "
                "unpacked)"
                if self.per_batch
                else f"{self.rows} rows packed into {self.sequences} sequences "
                f"({100 * (self.fill or 0):.1f}% of their max_seq_len filled; batch_size "
                "counts sequences)"
            ),
            "padded": f"{self.rows} rows, one per sequence, padded to each micro-batch's longest",
            "concat": f"{self.rows} rows concatenated into {self.sequences} blocks",
        }[self.mode]
        return f"packing {self.asked} -> {self.mode}: {what} ({self.why})"

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "asked": self.asked,
            "why": self.why,
            "flat": self.flat,
            "per_batch": self.per_batch,
            "rows": self.rows,
            "sequences": self.sequences,
            "fill": self.fill,
        }


def _packing_obstacle(model: nn.Module, s2_attn: bool) -> tuple[str | None, bool]:
    """(why packed rows cannot be kept apart in this model and method, or None; whether the
    micro-batch must be one row)."""
    if s2_attn:
        return (
            (
                "S2-Attn's shifted groups span the whole sequence, so they would mix the rows "
                "of a packed sequence"
            ),
            False,
        )
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    module = sys.modules.get(type(model).__module__)
    from transformers import masking_utils

    builders = (masking_utils.create_causal_mask, masking_utils.create_sliding_window_causal_mask)
    if not any(getattr(module, f.__name__, None) is f for f in builders):
        arch = type(model).__name__
        return (
            (
                f"{arch} does not build its attention mask with transformers' masking utilities, "
                "which are what keep packed rows apart"
            ),
            False,
        )
    if impl in MASKED_ATTENTION:
        return None, False
    if impl in FLASH_ATTENTION:
        return None, True
    return f"attention implementation {impl!r} is not one that keeps packed rows apart", False


def decide_layout(
    packing: bool | str, model: nn.Module, s2_attn: bool = False, objective: str = "sft"
) -> Layout:
    """The :class:`Layout` of ``data.packing`` for ``model``, the method (``s2_attn``) and
    the objective; ``true`` where packing cannot be exact is one sentence (a
    :class:`LorakitError`)."""
    asked = {True: "true", False: "false"}.get(packing, packing)
    if asked == "false":
        return Layout("padded", asked, "data.packing is false")
    if objective == "dpo":
        if asked != "auto":
            raise LorakitError(
                f"data.packing: {asked} packs SFT rows; DPO pairs run padded, each pair's "
                "chosen and rejected sequences in one batch (as TRL does): use "
                "data.packing=auto or false"
            )
        return Layout("padded", asked, "DPO runs each pair's two sequences padded, as TRL does")
    if asked == "concat":
        return Layout(
            "concat", asked, "data.packing is concat: rows concatenated into max_seq_len blocks"
        )
    obstacle, flat = _packing_obstacle(model, s2_attn)
    if obstacle is None:
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        why = f"{impl} attention keeps packed rows apart by their positions"
        return Layout("packed", asked, why, flat, per_batch=asked == "auto")
    if asked == "true":
        raise LorakitError(
            f"data.packing: true cannot keep packed rows apart here: {obstacle}; use "
            "data.packing=auto (pads instead) or data.group_by_length=true"
        )
    return Layout("padded", asked, obstacle)


# ---- packing ----------------------------------------------------------------------------


def best_fit_decreasing(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Bins of row indices, each holding at most ``capacity`` tokens: rows in decreasing
    length (ties in a seeded random order), each into the fullest bin it still fits in, or a
    new bin (Johnson 1973; TRL's ``pack_dataset`` strategy ``bfd``). Bins come out in the
    order they were opened."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep the seeded order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise LorakitError(f"a row of {n} tokens is longer than data.max_seq_len ({capacity})")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            if room > n:
                bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            if capacity > n:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_rows(examples: list[dict], max_len: int, seed: int = 0) -> list[dict]:
    """Whole rows packed into sequences of at most ``max_len`` tokens (See Note: packed
    sequences): each sequence's ``lengths`` lists its rows' lengths, and the first label of
    every row is -100."""
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], max_len, seed)
    out = []
    for rows in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in rows:
            ids += examples[i]["input_ids"]
            labels += [IGNORE, *examples[i]["labels"][1:]]
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "lengths": [len(examples[i]["input_ids"]) for i in rows],
            }
        )
    return out


def concat_blocks(examples: list[dict], max_len: int) -> list[dict]:
    """``data.packing: concat``: every row's tokens one after the other, cut into blocks of
    ``max_len`` (the last may be shorter). Rows are cut across blocks and attend to the rows
    before them."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
    return [
        {"input_ids": ids[i : i + max_len], "labels": labels[i : i + max_len]}
        for i in range(0, len(ids), max_len)
    ]


def arrange(examples: list[dict], layout: Layout, max_len: int, seed: int) -> list[dict]:
    """The training sequences of ``examples`` under ``layout`` (rows stay rows when they are
    packed per micro-batch: :func:`micro_batch` packs them)."""
    if layout.mode == "packed" and not layout.per_batch:
        return pack_rows(examples, max_len, seed)
    if layout.mode == "concat":
        return concat_blocks(examples, max_len)
    return examples


def fingerprint(examples: list[dict]) -> str:
    """A short digest of the sequences' lengths and row boundaries: a resumed run checks
    that it draws its batches from the same sequences as the interrupted one."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((len(e["input_ids"]), e.get("lengths"))).encode())
    return h.hexdigest()[:16]


# ---- micro-batches ----------------------------------------------------------------------


def collate(examples: list[dict], pad_id: int, flat: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch. Rows: right-padded to the longest, padding with attention 0 and label
    -100 (``input_ids``, ``attention_mask``, ``labels``). Packed sequences: ``position_ids``
    restarting at every row and no attention mask (See Note: packed sequences); padding
    forms a segment of its own; ``token_mask`` marks the tokens that are not padding;
    ``flat`` concatenates the sequences into one row."""
    if "lengths" not in examples[0]:
        return _padded(examples, pad_id)
    if flat:
        examples = [
            {
                "input_ids": [t for e in examples for t in e["input_ids"]],
                "labels": [t for e in examples for t in e["labels"]],
                "lengths": [n for e in examples for n in e["lengths"]],
            }
        ]
    b = _padded(examples, pad_id)
    n = b["input_ids"].shape[1]
    pos = torch.empty_like(b["input_ids"])
    for i, e in enumerate(examples):
        k = 0
        for m in [*e["lengths"], n - len(e["input_ids"])]:
            pos[i, k : k + m] = torch.arange(m)
            k += m
    return {
        "input_ids": b["input_ids"],
        "labels": b["labels"],
        "position_ids": pos,
        "token_mask": b.pop("attention_mask"),
    }


def _padded(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sequences(examples: list[dict], layout: Layout | None) -> list[dict]:
    """The sequences of a micro-batch. Packed per micro-batch (``auto``), the rows go into
    sequences no longer than the batch's longest row: the batch keeps the padded batch's
    length and so its attention cost per sequence, but holds fewer sequences (rows of
    uniform length stay one per sequence, as padded)."""
    if layout is not None and layout.mode == "packed" and layout.per_batch:
        return pack_rows(examples, max(len(e["input_ids"]) for e in examples))
    return examples


def micro_batch(
    examples: list[dict], layout: Layout | None, pad_id: int
) -> dict[str, torch.Tensor]:
    """The micro-batch of ``examples`` (rows or sequences) under ``layout``: packed first when
    the layout packs per micro-batch, then :func:`collate`."""
    flat = layout is not None and layout.flat
    return collate(_sequences(examples, layout), pad_id, flat)


def micro_batch_tokens(examples: list[dict], layout: Layout | None) -> tuple[int, int]:
    """(tokens the model processes, of which are rows' tokens) in :func:`micro_batch`."""
    flat = layout is not None and layout.flat
    return batch_tokens(_sequences(examples, layout), flat)


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model's forward for a collated ``batch``."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def token_mask(batch: dict) -> torch.Tensor:
    """1 where a collated ``batch`` holds a token of a row, 0 on padding."""
    return batch["token_mask"] if "token_mask" in batch else batch["attention_mask"]


def batch_tokens(examples: list[dict], flat: bool = False) -> tuple[int, int]:
    """(tokens the model processes, of which are rows' tokens) for the micro-batch
    :func:`collate` makes of ``examples``."""
    real = sum(len(e["input_ids"]) for e in examples)
    if not examples:
        return 0, 0
    if flat and "lengths" in examples[0]:
        return real, real
    return len(examples) * max(len(e["input_ids"]) for e in examples), real


# ---- which examples each step uses ------------------------------------------------------


class StepSampler:
    """Which examples each optimizer step uses: a seeded permutation per epoch, cut into
    global batches (``per_step`` examples; the last partial batch of an epoch is dropped).
    With ``lengths`` (``data.group_by_length``), each window of :data:`GROUP_WINDOW` global
    batches of the permutation is sorted by length before it is cut, and its batches are
    then taken in a seeded random order: a step's rows have similar lengths, so less of each
    micro-batch is padding, while the order of lengths over the epoch stays random.

    Everything is a function of (seed, step), so a resumed run reads exactly the batches an
    uninterrupted one would, and every process agrees on them without communicating."""

    def __init__(
        self,
        n: int,
        per_step: int,
        seed: int,
        lengths: list[int] | None = None,
        unit: str = "examples",
    ):
        if n < per_step:
            raise LorakitError(
                f"the training data has {n} {unit}, fewer than one optimizer "
                f"step needs ({per_step} = batch_size x grad_accum x processes)"
            )
        self.n, self.per_step, self.seed, self.lengths = n, per_step, seed, lengths
        self.steps_per_epoch = n // per_step
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return perm
        perm = perm[: self.steps_per_epoch * self.per_step]  # the dropped tail stays dropped
        rng = random.Random(self.seed * 1_000_003 + epoch)
        out: list[int] = []
        window = GROUP_WINDOW * self.per_step
        for w in range(0, len(perm), window):
            part = sorted(perm[w : w + window], key=lambda i: -self.lengths[i])
            steps = [part[k : k + self.per_step] for k in range(0, len(part), self.per_step)]
            rng.shuffle(steps)
            out += [i for s in steps for i in s]
        return out

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = self._permutation(epoch), epoch
        return self._perm[k * self.per_step : (k + 1) * self.per_step]
