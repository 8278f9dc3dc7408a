"""DELIA: Diversity-Enhanced Learning for Instruction Adaptation."""

from .errors import DeliaError

__version__ = "0.1.0"

API = ("load_config", "run", "stage", "self_sample", "mix")
"""The Python API (`delia.api`), imported on first use so `import delia` stays light."""
__all__ = ["DeliaError", "__version__", *API]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'delia' has no attribute {name!r}")
