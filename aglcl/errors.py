"""User-facing errors.

Raise :class:`AglclError` for anything the user can fix (a bad option, a missing file, a malformed
record). ``aglcl.cli`` prints it as one line on stderr and exits with status 2, without a traceback.
The message names the problem and, where there are any, the valid choices.

An :class:`OSError` the user can fix (no permission, a read-only or full disk) is printed the same way,
with its file name: see :func:`os_error_message`.
"""

import errno

_OUT = "another output directory (hydra.run.dir=..., or hydra.sweep.dir=... with -m)"
# errno -> (verb, hint): only conditions of the machine, never of the code, so no bug is hidden by them
_OS_ERRORS = {
    errno.EACCES: ("cannot access", f"check its permissions or choose {_OUT}"),
    errno.EPERM: ("cannot access", f"check its permissions or choose {_OUT}"),
    errno.EROFS: ("cannot write", f"choose {_OUT}"),
    errno.ENOSPC: ("cannot write", f"free some space or choose {_OUT}"),
    errno.EDQUOT: ("cannot write", f"free some space (disk quota) or choose {_OUT}"),
    errno.ENOTDIR: ("cannot access", "a part of that path is a file, not a directory"),
}


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


class RunInterrupted(BaseException):
    """Ctrl-C during a run: its message says what the run dir keeps and how to resume (exit status 130)."""


def os_error_message(exc: BaseException) -> str | None:
    """One line for an :class:`OSError` of the machine (permissions, read-only or full disk), else None.

    ``exc`` may also carry it as its ``__cause__`` (e.g. logging's ``ValueError: Unable to configure handler``
    raised from the OSError of opening a log file in a read-only dir)::

        cannot write /out/run/results.json: No space left on device; the disk is full; free some space ...
    """
    while exc is not None and not (isinstance(exc, OSError) and exc.errno in _OS_ERRORS):
        if isinstance(exc, AglclError):
            return None  # its own message says more
        exc = exc.__cause__
    if exc is None:
        return None
    verb, hint = _OS_ERRORS[exc.errno]
    where = f" {exc.filename}" if exc.filename is not None else ""
    return " ".join(f"{verb}{where}: {exc.strerror or exc}; {hint}".split())


def hydra_message(exc: BaseException) -> str:
    """One line out of Hydra's multi-line composition errors (unknown option, bad override)."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        return f"unknown option '{option}' for config group '{group}'; choose from: {', '.join(exc.options)}"
    text = str(exc).replace("\t", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)


def user_errors(task_function):
    """Decorate a Hydra task function so that user errors leave it as :class:`UserAbort`.

    User errors are :class:`AglclError` (also as the cause of another exception) and the OSErrors of
    :func:`os_error_message`.
    """
    import functools

    @functools.wraps(task_function)
    def wrapper(cfg):
        try:
            return task_function(cfg)
        except Exception as exc:
            cause = exc
            while cause is not None:  # e.g. a config's own check, wrapped by hydra's instantiate()
                if isinstance(cause, AglclError):
                    raise UserAbort(str(cause)) from None
                if isinstance(cause, OSError) and os_error_message(cause) is not None:
                    raise UserAbort(os_error_message(cause)) from cause  # AGLCL_DEBUG=1 shows its origin
                cause = cause.__cause__
            raise

    return wrapper
