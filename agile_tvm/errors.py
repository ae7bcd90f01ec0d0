"""User-facing errors.

A `UserError` is bad input the user can fix (a missing path, an unsupported architecture, an empty corpus). The CLI
prints its one-line message, which names the problem and the fix, without a traceback from deep inside torch or TVM.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
