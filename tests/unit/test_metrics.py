"""The generation metrics against hand-computed values (SQuAD v1.1 definitions)."""

from __future__ import annotations

import math

import pytest

from lorakit.training.evaluation import (
    default_max_new_tokens,
    f1_score,
    normalize_answer,
    normalized_match_score,
    perplexity,
    score,
)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear ", "apple pear"),
        ("Theater", "theater"),  # 'the' inside a word stays
        ("A", ""),
        ("42.", "42"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_and_normalized_match():
    s = score(" 42\n", "42")
    assert s["exact_match"] == 1.0 and s["normalized_match"] == 1.0
    s = score("The answer.", "answer")
    assert s["exact_match"] == 0.0 and s["normalized_match"] == 1.0
    assert normalized_match_score("Paris", "London") == 0.0


def test_f1_hand_computed():
    # pred tokens: [cat, sat, on, mat]; ref: [cat, sat] -> p = 2/4, r = 2/2, f1 = 2/3
    assert f1_score("The cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # pred [red, red, blue], ref [red, blue, green]: common = 1 red + 1 blue = 2
    # p = 2/3, r = 2/3, f1 = 2/3
    assert f1_score("red red blue", "red blue green") == pytest.approx(2 / 3)
    assert f1_score("", "") == 1.0 and f1_score("the", "answer") == 0.0
    assert f1_score("x y", "y x") == 1.0


def test_perplexity_and_default_cap(smollm2):
    _, tok = smollm2
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    refs = ["short", "a much longer reference answer " * 10]
    n = len(tok(refs[1], add_special_tokens=False)["input_ids"])
    assert default_max_new_tokens(tok, refs) == n + 16
    assert default_max_new_tokens(tok, ["word " * 5000]) == 1024


def test_number_metric_compares_the_last_number_as_gsm8k_scoring_does():
    from lorakit.training.number import last_number, number_score

    assert last_number("... so the answer is 42.") == 42
    assert last_number("#### 1,234") == 1234
    assert number_score("She pays 3 + 4 = 7 dollars, so the answer is 42.", "#### 42") == 1.0
    assert number_score("The total is 1234", "Natalia sold 48/2 = 24 clips.\n#### 1,234") == 1.0
    assert number_score("x = -7.50", "-7.5") == 1.0  # by value, the sign kept
    assert number_score("The answer is 41.", "#### 42") == 0.0
    assert number_score("I do not know.", "#### 42") == 0.0  # no number: wrong
    assert number_score("42", "no number here") == 0.0
    assert score("so 42.", "#### 42")["number"] == 1.0 and score("42", "43")["number"] == 0.0
