"""The Hugging Face Hub, reachable or not. Before delia asks for a Hub name (a model id, an `hf:` dataset)
it checks once that the Hub's host answers; when it does not, the libraries are put in offline mode, so a
name in the local cache still loads and one that is not fails at once, in one line, instead of after a
minute of retries."""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
from functools import lru_cache

TRUE = ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hub's host (`HF_ENDPOINT`, default huggingface.co) opens; False in
    offline mode (`HF_HUB_OFFLINE`)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "", url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except (OSError, ValueError):
        return False


def offline_unless_reachable() -> bool:
    """Offline mode for huggingface_hub, datasets and transformers when the Hub cannot be reached (also for
    those already imported); True when offline."""
    if reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:
            setattr(sys.modules[module], name, True)
    return True


def unreachable(name: str) -> str:
    """The reason to give for a Hub name that did not load while offline."""
    return f"the Hugging Face Hub cannot be reached from this machine and {name} is not in the local cache"
