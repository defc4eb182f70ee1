"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLI prints ``error: <message>`` on one line and exits 2.

    Raise it for anything the user can fix (a missing path, a malformed row, an unknown name);
    never for a bug in latentaudit.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
