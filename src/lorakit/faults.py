"""Faults on demand, for lorakit's own tests only: deterministic kills instead of races.

``LORAKIT_TEST_KILL_AT=POINT[:STEP]`` makes the process SIGKILL itself when a run reaches a
named point: ``checkpoint-write:N`` (halfway through writing the checkpoint of step N),
``after-step:N`` (right after optimizer step N, before its checkpoint) or ``adapter-save``
(halfway through writing the final adapter folder). Unset, it costs one dictionary lookup.
``LORAKIT_TEST_BROKEN_COMPILER=1`` makes ``train.compile``'s backend fail as a machine
without a C++ compiler does (for a test that needs it in another process).
"""

from __future__ import annotations

import os
import signal

ENV = "LORAKIT_TEST_KILL_AT"


def kill_point(point: str, step: int | None = None) -> None:
    """SIGKILL this process if ``LORAKIT_TEST_KILL_AT`` names ``point`` (and ``step``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and (not at or (step is not None and step == int(at))):
        os.kill(os.getpid(), signal.SIGKILL)


def broken_compiler(graph, example_inputs):
    """A torch.compile backend that fails as inductor does without a C++ compiler."""
    raise RuntimeError("no C++ compiler")


def compile_backend(default):
    """``default``, or :func:`broken_compiler` when ``LORAKIT_TEST_BROKEN_COMPILER`` is set."""
    return broken_compiler if os.environ.get("LORAKIT_TEST_BROKEN_COMPILER") else default
