"""User-facing errors.

`BiseError` carries a one-line message naming the bad value and what is allowed. The CLI prints it as
`error: <message>` and exits with status 2, so users never see a traceback for bad input.
"""


class BiseError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def unknown_choice(what: str, value, allowed) -> BiseError:
    """The error for a `value` of `what` that is not one of `allowed`: how every bad choice is worded."""
    return BiseError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_choice(what: str, value, allowed) -> None:
    """Raise BiseError unless `value` is one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        raise unknown_choice(what, value, allowed)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (a cluster time limit, `timeout`, `kill`): handled like Ctrl-C, so the run
    is marked failed with the reason and resumes when re-run, but the command exits 143 instead of 130."""


def check_fraction(what: str, value) -> float:
    """`value` as a float in (0, 1] (a correlation such as rho), or a one-line BiseError naming `what`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BiseError(f"{what} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise BiseError(f"{what} must be in (0, 1], got {number}")
    return number
