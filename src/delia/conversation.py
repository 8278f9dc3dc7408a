"""The shape delia reads in a conversation (a list of `{"role", "content"}` messages): its first user
turn, and that turn's instruction paragraph, the row's *wording* (the text after the last blank line,
as in the paper's data). This module imports nothing of delia's, so every layer can read it."""

from __future__ import annotations


def first_user_turn(messages: list[dict]) -> dict:
    """The first user message: a general query, or a task row's prompt."""
    return next(m for m in messages if m["role"] == "user")


def replace_in_user_turns(messages: list[dict], replacements: dict[str, str]) -> list[dict]:
    """The conversation with each key of `replacements` replaced by its value in every user turn, in order."""
    out = []
    for m in messages:
        text = m["content"]
        if m["role"] == "user":
            for old, new in replacements.items():
                text = text.replace(old, new)
        out.append({**m, "content": text})
    return out


def wording_of(messages: list[dict]) -> str:
    """The instruction paragraph of the first user turn (its last paragraph)."""
    return first_user_turn(messages)["content"].rstrip().split("\n\n")[-1].strip()


def split_wording(text: str) -> tuple[str, str]:
    """(what comes before the instruction paragraph, the paragraph) of a user turn's text; ('', text)
    when it has one paragraph."""
    head, _, wording = text.rstrip().rpartition("\n\n")
    return head, wording


def set_wording(row: dict, wording: str) -> dict:
    """The same row with its instruction wording (the first user turn's last paragraph) replaced; an
    empty wording drops the paragraph."""
    messages = [dict(m) for m in row["messages"]]
    user = first_user_turn(messages)
    head, sep, _ = user["content"].rstrip().rpartition("\n\n")
    user["content"] = (head + sep + wording if wording else head) if sep else wording
    return {**row, "messages": messages, "wording": wording}
