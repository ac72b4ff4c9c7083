"""The one exception type that the command-line interfaces turn into a one-line message and exit code 2, and the
way an exception from a library becomes part of such a line."""


class InputError(ValueError):
    """Bad user input: a malformed manifest, a missing file, a corrupt raster, an unknown split.

    The message is a single line that names the file or key and what was expected.
    """


def first_line(exc: BaseException, *, named: bool = True) -> str:
    """An exception as one line, for a one-line error: the first non-blank line of its message (library messages
    often run over several), after its type's name when ``named``; the type's name alone when the message is blank."""
    line = next((text.strip() for text in str(exc).splitlines() if text.strip()), "")
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if named else line


def exit_on_input_error(func):
    """Decorate a command so that an :class:`InputError` prints ``error: <message>`` and exits with code 2."""
    import functools
    import sys

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
