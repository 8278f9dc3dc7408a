"""The one user-facing error."""


class DeliaError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""


DeliaError.__module__ = "delia"  # its public name, as tracebacks and pickles show it (`from delia import DeliaError`)
