"""The data formats of LLaMA-Factory, axolotl and TRL: each trains two steps on the tiny model;
in a multi-turn chat every assistant turn's tokens carry labels and no other token does."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.training.data import IGNORE, encode_row
from tests.conftest import tiny_run_args

TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"},
                                               "b": {"type": "number"}}}}}]

ROWS = {
    "sharegpt": lambda i: {"system": "You add numbers.", "tools": json.dumps(TOOLS),
                           "conversations": [
                               {"from": "human", "value": f"What is {i} + 2?"},
                               {"from": "function_call", "value": '{"name": "add"}'},
                               {"from": "observation", "value": str(i + 2)},
                               {"from": "gpt", "value": f"It is {i + 2}."}]},
    "trl_conversational": lambda i: {
        "prompt": [{"role": "user", "content": f"Say {i}."}],
        "completion": [{"role": "assistant", "content": f"{i}"}]},
    "content_parts": lambda i: {"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"Count to {i}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " ".join(
            str(k) for k in range(1, i % 5 + 2))}]}]},
    "alpaca_with_history": lambda i: {"instruction": f"And {i}?", "output": f"{i}",
                                      "system": "Answer with a number.",
                                      "history": [["Say 1.", "1"]]},
}


@pytest.mark.parametrize("kind", list(ROWS))
def test_format_trains_two_steps(kind, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(ROWS[kind](i)) + "\n" for i in range(24)))
    out = tmp_path / "run"
    assert main(["train", *tiny_run_args(tiny_model_dir, out, f"data.train={data}",
                                         "train.max_steps=2", "eval.compare_base=false")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tuned"]["generation"]["examples"] > 0


def test_a_row_with_an_image_is_skipped_with_its_reason(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    image = {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"},
                                                       {"type": "text", "text": "What?"}]},
                          {"role": "assistant", "content": "A cat."}]}
    data.write_text(json.dumps(image) + "\n" + "".join(
        json.dumps(ROWS["content_parts"](i)) + "\n" for i in range(20)))
    assert main(["train", *tiny_run_args(tiny_model_dir, tmp_path / "run", f"data.train={data}",
                                         "train.max_steps=1", "eval.compare_base=false")]) == 0
    err = capsys.readouterr().err
    assert "line 1: a image content part (lorakit trains on text only)" in err


def test_every_assistant_turn_and_nothing_else_carries_labels(smollm2):
    _, tok = smollm2
    turns = [("user", "Hello there"), ("assistant", "Hi! How can I help?"),
             ("user", "What is 2 + 2?"), ("assistant", "It is 4."),
             ("user", "Thanks"), ("assistant", "You are welcome.")]
    row = {"messages": [{"role": r, "content": c} for r, c in turns]}
    ex = encode_row(row, "chat", tok, 512, "all_assistant")
    learned = tok.decode([t for t in ex["labels"] if t != IGNORE])
    assert learned == "".join(f"{c}<|im_end|>\n" for r, c in turns if r == "assistant")
    # contiguous labelled runs: exactly one per assistant turn, none on a user turn
    runs, inside = 0, False
    for t in ex["labels"]:
        runs += t != IGNORE and not inside
        inside = t != IGNORE
    assert runs == 3
    last = encode_row(row, "chat", tok, 512, "last_assistant")
    assert tok.decode([t for t in last["labels"] if t != IGNORE]) == "You are welcome.<|im_end|>\n"
    every = encode_row(row, "chat", tok, 512, "all")
    assert all(t != IGNORE for t in every["labels"])
