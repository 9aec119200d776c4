"""User-facing errors.

`BiseError` carries a one-line message naming the bad value and what is allowed. The CLI prints it as
`error: <message>` and exits with status 2, so users never see a traceback for bad input.
"""


class BiseError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check_choice(what: str, value, allowed) -> None:
    """Raise BiseError unless `value` is one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        raise BiseError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (a cluster time limit, `timeout`, `kill`): handled like Ctrl-C, so the run
    is marked failed with the reason and resumes when re-run, but the command exits 143 instead of 130."""
