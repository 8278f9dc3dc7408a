"""DELIA: Diversity-Enhanced Learning for Instruction Adaptation."""

__version__ = "0.1.0"


class DeliaError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""
