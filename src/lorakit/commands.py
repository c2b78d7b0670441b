"""Subcommands beyond ``methods``; each one parses its arguments and calls the library."""

from __future__ import annotations
