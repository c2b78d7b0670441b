"""The ``number`` metric: the last number of the answer equals the reference's.

GSM8K's reference answers end with ``#### <number>`` (Cobbe et al. 2021, "Training
Verifiers to Solve Math Word Problems"), and its accuracy is the final number of a generated
solution against that number; PEFT's MetaMathQA benchmark (``method_comparison/MetaMathQA``)
scores its GSM8K test accuracy the same way. The number is compared by value: thousands
separators are dropped ("1,234" is 1234), so are a trailing period and zeros after the
decimal point ("42.", "42.0" and "42" are equal), and a leading minus sign is kept.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

#: a number: digits with optional thousands separators ("1,234,567"), an optional fraction
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> Decimal | None:
    """The value of the last number in ``text``, or None when it holds none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches valid numbers
        return None


def number_score(prediction: str, reference: str) -> float:
    """1.0 when the last number of ``prediction`` equals that of ``reference`` (by value);
    0.0 otherwise, also when either holds no number."""
    p, r = last_number(prediction), last_number(reference)
    return float(p is not None and r is not None and p == r)
