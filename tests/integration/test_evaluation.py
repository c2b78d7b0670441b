"""Evaluation end to end: long answers generated to their end, cuts reported, the run's
held-out rows found again by ``lorakit eval``, predictions written and read back."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main

ANSWER = (
    "The committee met on Tuesday morning and agreed that the new bridge across the "
    "river will open in the spring, after the final inspection of its steel cables and "
    "lights, and the mayor thanked the engineers for their careful work."
)


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def long_answer_run(tiny_model_dir, tmp_path_factory):
    """A tiny model fully fine-tuned until it has learned one 40+ token answer."""
    d = tmp_path_factory.mktemp("long")
    data = d / "long.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Report {i}: what did the committee decide?"},
                        {"role": "assistant", "content": ANSWER},
                    ]
                }
            )
            + "\n"
            for i in range(60)
        )
    )
    out = d / "run"
    assert (
        main(
            [
                "train",
                f"model={tiny_model_dir}",
                f"output_dir={out}",
                f"data.train={data}",
                "data.valid_ratio=0.1",
                "adapter.method=full",
                "train.precision=fp32",
                "train.batch_size=8",
                "train.max_steps=80",
                "train.lr=1e-2",
                "train.schedule=constant",
                "eval.compare_base=false",
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow  # full fine-tuning until 40-token answers are learned: ~30 s
def test_long_answers_score_through_eval_and_cuts_are_reported(long_answer_run, capsys, tmp_path):
    from transformers import AutoTokenizer

    out = long_answer_run
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    assert len(tok(ANSWER, add_special_tokens=False)["input_ids"]) >= 40
    summary = json.loads((out / "summary.json").read_text())
    tuned = summary["tuned"]
    # the metric is computed on the file's held-out rows, which were never trained on
    held = json.loads((out / "heldout.json").read_text())
    assert held["metric"]["lines"] == held["valid"]["lines"] and len(held["valid"]["lines"]) == 6
    assert tuned["generation"]["examples"] == 6 and tuned["exact_match"] == 1.0

    capsys.readouterr()
    assert main(["eval", str(out / "adapter")]) == 0  # no flag: the run's held-out rows
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["exact_match"] == 1.0 and res["f1"] == 1.0 and res["cut_answers"] == 0
    assert res["split"] == "held-out rows" and res["examples"] == 6
    assert res["max_new_tokens"] >= 40 + 16
    # the run's own figures again: same rows, same precision
    assert res["loss"] == pytest.approx(tuned["valid_loss"], abs=1e-6)
    for k in ("exact_match", "normalized_match", "f1", "general_text_loss"):
        assert res[k] == pytest.approx(tuned[k], abs=1e-6), k
    assert res["dtype"] == summary["precision"]

    preds = tmp_path / "cut.jsonl"
    assert main(["eval", str(out), "--max-new-tokens", "10", "--predictions", str(preds)]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["cut_answers"] == 6 and res["exact_match"] == 0.0
    assert "6 of 6 answers were cut at 10 tokens" in res["cut_note"]
    assert "6 of 6 answers were cut at 10 tokens" in captured.err
    rows = _jsonl(preds)
    assert len(rows) == 6 and all(r["cut"] and r["tokens"] == 10 for r in rows)
    assert all(r["reference"] == ANSWER and ANSWER.startswith(r["prediction"]) for r in rows)
    assert sum(r["f1"] for r in rows) / 6 == pytest.approx(res["f1"])


@pytest.mark.slow  # full fine-tuning until 40-token answers are learned: ~30 s
def test_run_predictions_agree_with_the_summary(long_answer_run):
    out = long_answer_run
    summary = json.loads((out / "summary.json").read_text())
    rows = _jsonl(out / "predictions.jsonl")
    assert summary["tuned"]["predictions"] == "predictions.jsonl"
    for m in ("exact_match", "normalized_match", "f1"):
        assert sum(r[m] for r in rows) / len(rows) == pytest.approx(summary["tuned"][m])
    assert {r["prompt"].split("Report ")[1].split(":")[0] for r in rows}.isdisjoint(
        {str(i) for i in range(60)}
        - {str(n - 1) for n in json.loads((out / "heldout.json").read_text())["valid"]["lines"]}
    )


@pytest.mark.slow  # full fine-tuning until 40-token answers are learned: ~30 s
def test_plain_text_gets_loss_and_perplexity(long_answer_run, tmp_path, capsys):
    text = tmp_path / "prose.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": f"Paragraph {i} about rivers and bridges."}) + "\n"
            for i in range(4)
        )
    )
    assert main(["eval", str(long_answer_run / "adapter"), "--data", str(text)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "exact_match" not in res and res["examples"] == 4
    assert res["valid_perplexity"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
