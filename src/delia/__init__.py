"""DELIA: Diversity-Enhanced Learning for Instruction Adaptation."""

__version__ = "0.1.0"


class DeliaError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""


API = ("load_config", "run", "stage", "self_sample", "mix")
"""The Python API (`delia.api`), imported on first use so `import delia` stays light."""


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'delia' has no attribute {name!r}")
