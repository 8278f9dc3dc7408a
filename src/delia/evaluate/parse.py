"""Find and parse the answer object in model output, as the paper measures formatted text.

Take the earliest `{...}` (balanced braces), repair quotes, parse with `json` or `ast.literal_eval`
(never `eval`).
"""

from __future__ import annotations

import ast
import json
import re

_SMART = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def _balanced(text: str, start: int, quote_aware: bool) -> int | None:
    """Index of the brace closing the one at `start`, or None if the object never closes."""
    depth, quote, escaped = 0, None, False
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
            continue
        if quote_aware and c in "'\"":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _loads(candidate: str) -> object | None:
    for attempt in (candidate, candidate.translate(_SMART)):
        try:
            return json.loads(attempt)
        except ValueError:
            pass
        try:
            return ast.literal_eval(attempt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    # single-quoted keys and values with apostrophes inside: quote the keys, then the values
    fixed = re.sub(r"'([A-Za-z_][\w ]*)'\s*:", r'"\1":', candidate.translate(_SMART))
    fixed = re.sub(r":\s*'(.*?)'\s*(?=[,}])", lambda m: ": " + json.dumps(m.group(1)), fixed)
    try:
        return json.loads(fixed)
    except ValueError:
        return None


def extract_object(text: str) -> dict | None:
    """The earliest parseable `{...}` object in `text` (a dict), or None."""
    start = text.find("{")
    if start < 0:
        return None
    for quote_aware in (True, False):
        end = _balanced(text, start, quote_aware)
        if end is not None:
            obj = _loads(text[start : end + 1])
            if isinstance(obj, dict):
                return obj
    return None


def normalise_label(value: object) -> str:
    return str(value).strip().strip(".").lower()


def opens_object(text: str, keys: list[str]) -> bool:
    """The answer attempts the format: somewhere a `{` is followed by one of the required keys (quoted
    or not). A malformed object still counts; prose that only mentions braces does not."""
    if not keys:
        return "{" in text
    names = "|".join(re.escape(k) for k in keys)
    return re.search(rf"\{{\s*[\"'\u201c\u2018]?\s*(?:{names})\b", text) is not None
