"""The data formats of LLaMA-Factory, axolotl and TRL: each trains two steps on the tiny model;
in a multi-turn chat every assistant turn's tokens carry labels and no other token does."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.training.data import IGNORE, encode_row
from tests.conftest import tiny_run_args

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
    }
]

ROWS = {
    "sharegpt": lambda i: {
        "system": "You add numbers.",
        "tools": json.dumps(TOOLS),
        "conversations": [
            {"from": "human", "value": f"What is {i} + 2?"},
            {"from": "function_call", "value": '{"name": "add"}'},
            {"from": "observation", "value": str(i + 2)},
            {"from": "gpt", "value": f"It is {i + 2}."},
        ],
    },
    "trl_conversational": lambda i: {
        "prompt": [{"role": "user", "content": f"Say {i}."}],
        "completion": [{"role": "assistant", "content": f"{i}"}],
    },
    "content_parts": lambda i: {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Count to {i}"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": " ".join(str(k) for k in range(1, i % 5 + 2))}
                ],
            },
        ]
    },
    "alpaca_with_history": lambda i: {
        "instruction": f"And {i}?",
        "output": f"{i}",
        "system": "Answer with a number.",
        "history": [["Say 1.", "1"]],
    },
}


@pytest.mark.parametrize("kind", list(ROWS))
def test_format_trains_two_steps(kind, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(ROWS[kind](i)) + "\n" for i in range(24)))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    f"data.train={data}",
                    "train.max_steps=2",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tuned"]["generation"]["examples"] > 0


def test_a_row_with_an_image_is_skipped_with_its_reason(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    image = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    data.write_text(
        json.dumps(image)
        + "\n"
        + "".join(json.dumps(ROWS["content_parts"](i)) + "\n" for i in range(20))
    )
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    tmp_path / "run",
                    f"data.train={data}",
                    "train.max_steps=1",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "line 1: a image content part (lorakit trains on text only)" in err


def test_every_assistant_turn_and_nothing_else_carries_labels(smollm2):
    _, tok = smollm2
    turns = [
        ("user", "Hello there"),
        ("assistant", "Hi! How can I help?"),
        ("user", "What is 2 + 2?"),
        ("assistant", "It is 4."),
        ("user", "Thanks"),
        ("assistant", "You are welcome."),
    ]
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


def test_a_txt_file_trains_one_row_per_paragraph(tiny_model_dir, tmp_path):
    from lorakit.training.data import read_rows

    data = tmp_path / "notes.txt"
    paras = [f"Paragraph {i} about bread and rivers.\nIt has a second line." for i in range(30)]
    data.write_text("\n\n\n".join(paras) + "\n", encoding="utf-8")
    rows = read_rows(str(data))
    assert [r["text"] for r in rows.rows] == paras
    assert [r["_line"] for r in rows.rows[:3]] == [1, 5, 9]  # first line of each paragraph
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    f"data.train={data}",
                    "train.max_steps=2",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "valid_perplexity" in summary["tuned"]


def test_left_truncation_keeps_the_answer_of_a_long_prompt(smollm2):
    _, tok = smollm2
    row = {"prompt": "word " * 300 + "Question: 2 + 2?", "completion": "4"}
    assert encode_row(row, "prompt_completion", tok, 64) is None  # the answer was cut off
    ex = encode_row(row, "prompt_completion", tok, 64, truncation="left")
    assert len(ex["input_ids"]) == 64
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(answer).startswith("4")
    assert "Question: 2 + 2?" in tok.decode(ex["input_ids"])
    short = {"prompt": "Question: 2 + 2?", "completion": "4"}
    assert encode_row(short, "prompt_completion", tok, 64, truncation="left") == encode_row(
        short, "prompt_completion", tok, 64
    )


def test_two_files_train_together_with_weights(tiny_model_dir, tmp_path):
    import lorakit as lk
    from lorakit.config import load_run_config
    from lorakit.training.loop import prepare_data

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(ROWS["content_parts"](i)) + "\n" for i in range(20)))
    b.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Hi {i}"},
                        {"role": "assistant", "content": "Hello"},
                    ]
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    f"data.train=[{a}, {b}]",
                    "data.weights=[2, 0.5]",
                    "train.max_steps=2",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    record = json.loads((out / "heldout.json").read_text())
    assert [p["data"] for p in record["valid"]] == [str(a), str(b)]
    assert all(p["lines"] for p in record["valid"])  # each file holds out its own rows
    cfg = load_run_config(None, [f"data.train=[{a}, {b}]", "data.weights=[2, 0.5]"])
    _, tok = lk.load_model(str(tiny_model_dir))
    examples, heldout, _ = prepare_data(cfg, tok, lambda s: None)
    n_a, n_b = 20 - len(record["valid"][0]["lines"]), 40 - len(record["valid"][1]["lines"])
    assert len(examples) == 2 * n_a + round(0.5 * n_b)
    assert len(heldout.valid_examples) == len(record["valid"][0]["lines"]) + len(
        record["valid"][1]["lines"]
    )
    assert main(["eval", str(out / "adapter")]) == 0  # lorakit eval reads the same record


def test_files_in_different_formats_are_refused_in_one_sentence(tiny_model_dir, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    b.write_text(
        "".join(json.dumps({"prompt": f"Say {i}", "completion": str(i)}) + "\n" for i in range(20))
    )
    out = tmp_path / "run"
    assert main(["train", *tiny_run_args(tiny_model_dir, out, f"data.train=[{a}, {b}]")]) == 2
    assert "files trained together must share one format" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(
            [
                "train",
                *tiny_run_args(tiny_model_dir, out, f"data.train=[{a}, {b}]", "data.weights=[1]"),
            ]
        )
        == 2
    )
    assert "data.weights has 1 values for 2 train file(s)" in capsys.readouterr().err


def test_a_hub_dataset_offline_and_not_cached_is_one_sentence(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    assert (
        main(["train", *tiny_run_args(tiny_model_dir, out, "data.train=someone/no-such-dataset")])
        == 2
    )
    err = capsys.readouterr().err
    assert "'someone/no-such-dataset' is not a local file" in err
    assert "not in the local Hugging Face datasets cache" in err and "Traceback" not in err
    assert not out.exists()


def test_columns_and_roles_map_a_file_that_names_its_fields_otherwise(
    tiny_model_dir, tmp_path, capsys
):
    from lorakit.training.data import Rows, remap

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "dialog": [
                        {"speaker": "Q", "text": f"Say {i}."},
                        {"speaker": "A", "text": str(i)},
                    ]
                }
            )
            + "\n"
            for i in range(24)
        )
    )
    mapped = remap(
        Rows([{"dialog": [{"speaker": "Q", "text": "Hi"}]}]),
        {"messages": "dialog", "role": "speaker", "content": "text"},
        {"Q": "user", "A": "assistant"},
    )
    assert mapped.rows == [{"messages": [{"role": "user", "content": "Hi"}]}]
    out = tmp_path / "run"
    args = tiny_run_args(
        tiny_model_dir,
        out,
        f"data.train={data}",
        "data.columns={messages: dialog, role: speaker, content: text}",
        "data.roles={Q: user, A: assistant}",
        "train.max_steps=2",
        "eval.compare_base=false",
    )
    assert main(["train", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tuned"]["generation"]["examples"] > 0  # held-out rows mapped too
    assert main(["eval", str(out / "adapter")]) == 0
    alpaca = tmp_path / "qa.jsonl"
    alpaca.write_text(
        "".join(json.dumps({"question": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(24))
    )
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    tmp_path / "r2",
                    f"data.train={alpaca}",
                    "train.max_steps=1",
                    "data.columns={instruction: question, output: answer}",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    tmp_path / "r3",
                    f"data.train={data}",
                    "data.columns={dialogue: dialog}",
                ),
            ]
        )
        == 2
    )
    assert "data.columns: 'dialogue' is not a field lorakit reads" in capsys.readouterr().err


def test_columns_take_alternatives_and_prompt_templates():
    """PEFT's MetaMathQA setup: MetaMathQA's query/response and GSM8K's question/answer
    become one prompt/completion format, the prompt in PEFT's query template."""
    from lorakit.training.data import Rows, remap

    template = "Question: {%s} Think step by step.\nAnswer:"
    columns = {
        "prompt": [template % "query", template % "question"],
        "completion": ["response", "answer"],
    }
    rows = remap(
        Rows(
            [
                {"query": "2+2?", "response": "The answer is: 4", "_line": 1},
                {"question": "3+3?", "answer": "3+3=6\n#### 6", "_line": 2},
            ],
            [],
            "x",
        ),
        columns,
        {},
    ).rows
    assert rows[0]["prompt"] == "Question: 2+2? Think step by step.\nAnswer:"
    assert rows[0]["completion"] == "The answer is: 4"
    assert rows[1]["prompt"] == "Question: 3+3? Think step by step.\nAnswer:"
    assert rows[1]["completion"] == "3+3=6\n#### 6"


def test_a_hub_spec_names_its_configuration_and_split(monkeypatch):
    import datasets

    from lorakit.training.data import read_rows

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "q", "answer": "#### 1"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert read_rows("openai/gsm8k:main@test", "valid").rows[0]["answer"] == "#### 1"
    read_rows("meta-math/MetaMathQA")
    assert calls == [("openai/gsm8k", "main", "test"), ("meta-math/MetaMathQA", None, "train")]
