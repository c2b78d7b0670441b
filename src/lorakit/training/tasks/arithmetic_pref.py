"""``arithmetic-pref``: preference pairs over the ``arithmetic`` questions, for DPO offline.

Each row is a pair in TRL's conversational format with an explicit prompt: the question, the
right answer as ``chosen`` and a near miss as ``rejected`` (the answer off by 1 to 10, either
way, or with two digits swapped; seeded). The three splits hold the same questions as
``arithmetic``'s (disjoint test, validation and training questions), so a model tuned on
``arithmetic`` and then on these pairs is scored on questions it never saw; the test split's
chosen answers are the references of the exact-match metric (docs/preference.md).
"""

from __future__ import annotations

import random

from .arithmetic import Arithmetic


def near_miss(answer: int, rng: random.Random) -> int:
    """A plausible wrong answer: off by 1-10, or (half the time, when it has two digits or
    more) the last two digits swapped."""
    text = str(abs(answer))
    if len(text) >= 2 and text[-1] != text[-2] and rng.random() < 0.5:
        swapped = int(text[:-2] + text[-1] + text[-2])
        return -swapped if answer < 0 else swapped
    return answer + rng.choice([-1, 1]) * rng.randint(1, 10)


class ArithmeticPref(Arithmetic):
    name = "arithmetic-pref"
    metric = "exact_match"

    def rows(self, split: str, max_len: int | None = None) -> list[dict]:
        rng = random.Random({"train": 31, "valid": 32, "test": 33}[split])
        out = []
        for row in super().rows(split, max_len):
            question, answer = row["messages"][0]["content"], int(row["messages"][1]["content"])
            out.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": str(answer)}],
                    "rejected": [{"role": "assistant", "content": str(near_miss(answer, rng))}],
                }
            )
        return out
