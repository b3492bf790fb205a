"""User-facing errors: one line, exit code 2, no traceback.

Raise :class:`UserError` for anything the user can fix (bad config, bad file, bad flag). The CLI
prints ``r1zero: error: <message>`` and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2  # argparse's and the guide's exit code for bad input


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    def __init__(self, message: str):
        # Keep it one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))
