"""The base classes of typed options, below both ``config.py`` and ``adapters/``.

A method's module declares its own options as a :class:`MethodOptions` subclass; ``config.py``
validates ``adapter.<method>`` with it. Keeping the base here means no adapter module imports
``config.py``, which itself runs method code (through the registry) while it validates: the
import graph shows every edge, and every edge points down (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config section: unknown keys refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodOptions(Strict):
    """Base of a method's own options (``adapter.<method>: {...}``), declared in its module.

    ``RENAMED`` maps names an option had before (flat in ``adapter``, or in PEFT) to its
    field, so that an old config gets one sentence naming the new key."""

    RENAMED: ClassVar[dict[str, str]] = {}
