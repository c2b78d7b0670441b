"""The one exception type lorakit raises for a user's mistake.

The CLI prints its message (one sentence) and exits with code 2, without a traceback.
"""


class LorakitError(Exception):
    """A problem with the user's input (config, data, adapter, model path): one clear sentence."""
