"""Packed sequences (training/batching.py, docs/packing.md) equal the same rows unpacked, for
every method, in fp32: each row's logits and loss against the row run alone (tolerance 1e-5),
one step's gradients against the padded batch of the same rows (1e-5 relative to the largest
gradient of each tensor), no leak between rows, LoRA-drop's importance measured on packed
batches, and where packing is refused (S2-Attn) or cannot apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.training.batching import (
    StepSampler,
    batch_tokens,
    best_fit_decreasing,
    collate,
    decide_layout,
    model_inputs,
    pack_rows,
)
from lorakit.training.loss import loss_sum
from tests.conftest import tiny_model, train_steps

TOL = 1e-5
LENGTHS = [5, 9, 3, 7, 11, 2, 6]

#: every method (and LongLoRA's parts that can pack: trained embeddings and norms, RoPE
#: interpolation), as lk.apply options
METHODS = {
    "lora": {"method": "lora"},
    "qlora": {"method": "lora", "quantize": "nf4", "quant_compute_dtype": "float32"},
    "lora+": {"method": "lora", "loraplus_ratio": 16},
    "lora-fa": {"method": "lora-fa"},
    "lora-drop": {"method": "lora-drop"},
    "adalora": {"method": "adalora"},
    "dora": {"method": "dora"},
    "full": {"method": "full"},
    "longlora-without-s2": {"method": "longlora", "s2_attn": False, "context_length": 512},
}


def _rows(seed: int = 3, vocab: int = 96) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for j, n in enumerate(LENGTHS):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        # odd rows: a prompt of up to 2 tokens without labels (a chat row); even rows: labels
        # on every token (plain text), whose first label a pack must not train on
        p = min(2, n - 1) if j % 2 else 0
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def _model(opts: dict, attn: str = "sdpa"):
    model = tiny_model("llama")
    model.config._attn_implementation = attn
    extra = {} if opts["method"] == "full" else {"r": 4, "alpha": 8, "dropout": 0.0}
    model = lk.apply(model, **opts, **extra)
    if opts["method"] != "full":
        train_steps(model)  # B (and the rest) away from its initial zeros
    return model.eval()


def _row_losses(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Sum of next-token cross-entropies of one row (its first label never counts)."""
    y = torch.tensor(labels[1:])
    return nn.functional.cross_entropy(logits[:-1].float(), y, ignore_index=-100, reduction="sum")


def _packed_rows(model, rows: list[dict], capacity: int) -> list[tuple[int, torch.Tensor]]:
    """(row index, its logits) out of a forward of the packed batch."""
    packs = pack_rows(rows, capacity, seed=0)
    order = best_fit_decreasing([len(r["input_ids"]) for r in rows], capacity, seed=0)
    logits = model(**model_inputs(collate(packs, 0)), use_cache=False).logits
    out = []
    for p, members in enumerate(order):
        k = 0
        for i in members:
            n = len(rows[i]["input_ids"])
            out.append((i, logits[p, k : k + n]))
            k += n
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_packed_rows_equal_each_row_alone(name):
    model, rows = _model(METHODS[name]), _rows()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
        packed = _packed_rows(model, rows, capacity=16)
    assert len({i for i, _ in packed}) == len(rows)
    for i, logits in packed:
        assert (logits - alone[i]).abs().max() <= TOL, (name, i)
        want = _row_losses(alone[i], rows[i]["labels"])
        got = _row_losses(logits, rows[i]["labels"])
        assert abs(got - want) <= TOL * max(1.0, abs(want)), (name, i, got, want)


@pytest.mark.parametrize("name", list(METHODS))
def test_one_step_gradients_equal_the_padded_batch(name):
    model, rows = _model(METHODS[name]), _rows()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(batch) -> tuple[dict, float, int]:
        model.zero_grad(set_to_none=True)
        s, n = loss_sum(model, batch)
        (s / n).backward()
        return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}, s.item(), n

    padded, s_pad, n_pad = grads(collate(rows, 0))
    packed, s_pack, n_pack = grads(collate(pack_rows(rows, 16, seed=0), 0))
    assert n_pack == n_pad and abs(s_pack - s_pad) <= TOL * abs(s_pad)
    assert padded.keys() == packed.keys() and padded
    for k, g in padded.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert (packed[k] - g).abs().max() / scale <= TOL, (name, k)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_row_does_not_see_its_neighbours(arch, attn):
    """Change every other row of a pack: the row's logits do not move (bit for bit in eager)."""
    model = tiny_model(arch)
    model.config._attn_implementation = attn
    model = lk.apply(model, method="lora", r=4, alpha=8)
    train_steps(model)
    rows = _rows()
    other = _rows(seed=9)  # same lengths, other tokens
    mixed = [rows[0]] + other[1:]
    with torch.no_grad():
        a = dict(_packed_rows(model, rows, capacity=40))[0]
        b = dict(_packed_rows(model, mixed, capacity=40))[0]
        alone = model(input_ids=torch.tensor([rows[0]["input_ids"]])).logits[0]
    assert (a - b).abs().max() <= TOL
    assert (a - alone).abs().max() <= TOL


def test_lora_drop_importance_on_packed_batches_equals_padded():
    from lorakit.adapters.lora_drop import layer_output_energy

    model, rows = _model(METHODS["lora-drop"]), _rows()
    padded = layer_output_energy(model, [collate(rows, 0)])
    packed = layer_output_energy(model, [collate(pack_rows(rows, 16, seed=0), 0)])
    for k, v in padded.items():
        assert abs(packed[k] - v) <= TOL * v, k


def test_flat_layout_is_one_row_with_the_same_rows():
    rows = _rows()
    packs = pack_rows(rows, 16, seed=0)
    flat = collate(packs, 0, flat=True)
    assert flat["input_ids"].shape == (1, sum(LENGTHS))
    assert batch_tokens(packs, flat=True) == (sum(LENGTHS), sum(LENGTHS))
    model = _model(METHODS["lora"])
    with torch.no_grad():
        logits = model(**model_inputs(flat), use_cache=False).logits[0]
    k = 0
    for pk in packs:
        for n in pk["lengths"]:
            seg = flat["input_ids"][0, k : k + n]
            alone = model(input_ids=seg[None]).logits[0]
            assert (logits[k : k + n] - alone).abs().max() <= TOL
            k += n


def test_best_fit_decreasing_places_every_row_once_within_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (500,), generator=g).tolist()
    bins = best_fit_decreasing(lengths, 64, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    fill = sum(lengths) / (64 * len(bins))
    assert fill > 0.95, fill  # BFD on uniform lengths fills bins almost completely
    assert bins == best_fit_decreasing(lengths, 64, seed=1)  # reproducible
    with pytest.raises(LorakitError, match="longer than data.max_seq_len"):
        best_fit_decreasing([65], 64)


def test_packed_labels_never_cross_a_row_boundary():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    (pack,) = pack_rows(rows, 8, seed=0)
    b = collate([pack, {"input_ids": [7], "labels": [7], "lengths": [1]}], 0)
    assert pack["labels"] == [-100, 2, 3, -100, 5]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert b["token_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert "attention_mask" not in b  # transformers isolates rows only without one


def test_s2_attention_refuses_true_and_auto_pads():
    model = lk.apply(tiny_model("llama"), method="longlora")
    with pytest.raises(LorakitError, match="S2-Attn"):
        decide_layout(True, model, s2_attn=True)
    layout = decide_layout("auto", model, s2_attn=True)
    assert layout.mode == "padded" and "S2-Attn" in layout.why
    assert decide_layout("auto", tiny_model("llama")).mode == "packed"
    assert decide_layout("concat", model, s2_attn=True).mode == "concat"


def test_an_attention_that_cannot_isolate_rows_pads():
    model = tiny_model("llama")
    model.config._attn_implementation = "lorakit_unknown"
    assert decide_layout("auto", model).mode == "padded"
    with pytest.raises(LorakitError, match="cannot keep packed rows apart"):
        decide_layout(True, model)


def test_length_grouped_steps_cover_the_epoch_and_hold_similar_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 1000, (800,), generator=g).tolist()
    grouped = StepSampler(800, 8, seed=5, lengths=lengths)
    plain = StepSampler(800, 8, seed=5)
    steps = [grouped.indices(s) for s in range(100)]
    assert sorted(i for s in steps for i in s) == list(range(800))  # one epoch, every row once

    waste_grouped = sum(_padding_at(grouped, s, lengths) for s in range(100))
    waste_plain = sum(_padding_at(plain, s, lengths) for s in range(100))
    assert waste_grouped < 0.2 * waste_plain, (waste_grouped, waste_plain)
    again = StepSampler(800, 8, seed=5, lengths=lengths)  # a resumed run: the same steps
    assert [again.indices(s) for s in (57, 3, 100)] == [grouped.indices(s) for s in (57, 3, 100)]


def _padding_at(sampler: StepSampler, step: int, lengths: list[int]) -> float:
    total, real = batch_tokens([{"input_ids": [0] * lengths[i]} for i in sampler.indices(step)])
    return 1 - real / total
