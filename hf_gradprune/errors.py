"""One exception type for everything the user can fix: the CLI prints it on one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (model id, data, trigger, flag). The message names the input and the fix."""
