"""``arithmetic``: two-digit addition and subtraction, answered with the number only.

The embedded SmolLM2-135M-Instruct scores 0% exact match on it (it explains instead of
answering, and its sums are often wrong); a LoRA learns the format and most of the arithmetic
in a few minutes on two CPU cores. Generated deterministically; the three splits hold disjoint
questions.
"""

from __future__ import annotations

import random

PROMPT = "What is {a} {op} {b}? Answer with the number only."


class Arithmetic:
    name = "arithmetic"
    metric = "exact_match"
    sizes = {"train": 2000, "valid": 100, "test": 200}

    def _all_questions(self) -> list[tuple[int, str, int]]:
        qs = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"]
        random.Random(1234).shuffle(qs)
        return qs

    def rows(self, split: str, max_len: int | None = None) -> list[dict]:
        qs = self._all_questions()
        start = {
            "test": 0,
            "valid": self.sizes["test"],
            "train": self.sizes["test"] + self.sizes["valid"],
        }[split]
        out = []
        for a, op, b in qs[start : start + self.sizes[split]]:
            answer = a + b if op == "+" else a - b
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": PROMPT.format(a=a, op=op, b=b)},
                        {"role": "assistant", "content": str(answer)},
                    ]
                }
            )
        return out
