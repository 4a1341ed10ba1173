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


class UserAbort(BaseException):
    """Carries an :class:`AglclError` out of a Hydra job.

    Hydra catches ``Exception`` inside a job and prints its own multi-line report; a ``BaseException``
    passes through untouched, so ``aglcl.cli`` can print the one-line message.
    """


def user_errors(task_function):
    """Decorate a Hydra task function so that user errors leave it as :class:`UserAbort`."""
    import functools

    @functools.wraps(task_function)
    def wrapper(cfg):
        try:
            return task_function(cfg)
        except Exception as exc:
            cause = exc
            while cause is not None and not isinstance(cause, AglclError):
                cause = cause.__cause__  # e.g. a config's own check, wrapped by hydra's instantiate()
            if cause is None:
                raise
            raise UserAbort(str(cause)) from None

    return wrapper
