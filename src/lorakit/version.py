"""lorakit's version, in a module of its own: the package ``__init__``, the CLI and the adapter
files (``lorakit.json``) read it from here, and ``pyproject.toml`` reads it for the build."""

__version__ = "0.1.0"
