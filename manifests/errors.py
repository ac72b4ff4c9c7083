"""The one exception type that the command-line interfaces turn into a one-line message and exit code 2."""


class InputError(ValueError):
    """Bad user input: a malformed manifest, a missing file, a corrupt raster, an unknown split.

    The message is a single line that names the file or key and what was expected.
    """


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
