"""Built-in tasks: deterministic data with a verifiable metric, usable as ``data.train: task:NAME``.

A task gives chat-format rows (``{"messages": [user, assistant]}``) for the splits
``train``, ``valid`` and ``test``; the test split is scored by exact match of the greedy answer.
"""

from __future__ import annotations

from ...errors import LorakitError
from .arithmetic import Arithmetic
from .arithmetic_pref import ArithmeticPref
from .chat_lengths import ChatLengths
from .general_text import GeneralText
from .passkey import Passkey

TASKS = {
    t.name: t for t in (Arithmetic(), ArithmeticPref(), GeneralText(), Passkey(), ChatLengths())
}


def get_task(name: str):
    if name not in TASKS:
        raise LorakitError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]
