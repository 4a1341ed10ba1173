"""User-facing errors.

Raise :class:`AglclError` for anything the user can fix (a bad option, a missing file, a malformed
record). ``aglcl.cli`` prints it as one line on stderr and exits with status 2, without a traceback.
The message names the problem and, where there are any, the valid choices.
"""


class AglclError(Exception):
    """A problem with the user's input: printed as a single line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def choices(options) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(o) for o in sorted(options))
