"""One loader for chat data: messages, TRL prompt / completion (plain or conversational), alpaca and
sharegpt shapes, from any source `delia.data.sources` reads (JSON, JSONL, parquet, CSV, a saved
dataset folder, a Hugging Face dataset).

Every row becomes `{"messages": [{"role": ..., "content": ...}, ...]}`. Bad input raises a DeliaError
naming the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DeliaError
from .sources import read_source

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _content(value: object, where: str, field: str) -> object:
    """A message's content: a string, or a list of parts (`{"type": "text", "text": ...}`) joined by
    line breaks; any other part (an image, audio) is refused."""
    if not isinstance(value, list):
        return value
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DeliaError(f"{where}: field '{field}[{j}]': only text parts are read, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _message_list(messages: object, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list):
        raise DeliaError(f"{where}: field '{field}': expected a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DeliaError(f"{where}: field '{field}[{i}]': expected an object")
        out.append({"role": m.get("role"), "content": _content(m.get("content"), where, f"{field}[{i}].content")})
    return out


def to_messages(obj: object, where: str, need_answer: bool = True) -> list[dict]:
    """Convert one record (messages, TRL prompt / completion, sharegpt or alpaca shape) to a validated
    message list."""
    if not isinstance(obj, dict):
        raise DeliaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        field = "messages"
        out = _message_list(obj["messages"], where, field)
    elif "prompt" in obj:  # TRL: plain text, or conversational (lists of messages)
        field = "prompt"
        prompt, completion = obj["prompt"], obj.get("completion")
        if isinstance(prompt, str):
            out = [{"role": "user", "content": prompt}]
        else:
            out = _message_list(prompt, where, "prompt")
        if isinstance(completion, str):
            out.append({"role": "assistant", "content": completion})
        elif completion is not None:
            out += _message_list(completion, where, "completion")
    elif "conversations" in obj:
        field = "conversations"
        turns = obj["conversations"]
        if not isinstance(turns, list):
            raise DeliaError(f"{where}: field 'conversations': expected a list")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise DeliaError(f"{where}: field 'conversations[{i}]': expected an object")
            role = _SHAREGPT_ROLES.get(t.get("from"))
            if role is None:
                raise DeliaError(f"{where}: field 'conversations[{i}].from': unknown speaker {t.get('from')!r}")
            out.append({"role": role, "content": t.get("value")})
    elif "instruction" in obj:
        field = "instruction"
        obj = {k: v for k, v in obj.items() if v is not None or k == "instruction"}  # a table's empty cell
        for key in ("instruction", "input", "output"):
            if key in obj and not isinstance(obj[key], str):
                raise DeliaError(f"{where}: field '{key}': expected a string")
        query = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        out = [{"role": "user", "content": query}]
        if obj.get("output"):
            out.append({"role": "assistant", "content": obj["output"]})
    else:
        raise DeliaError(f"{where}: no 'messages', 'prompt', 'conversations' or 'instruction' field")
    _validate(out, where, field, need_answer)
    return out


def _validate(messages: list[dict], where: str, field: str, need_answer: bool) -> None:
    if not messages:
        raise DeliaError(f"{where}: field '{field}': empty conversation")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DeliaError(f"{where}: field '{field}[{i}].role': expected one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DeliaError(f"{where}: field '{field}[{i}].content': expected a string")
        if m["role"] == "user" and not m["content"].strip():
            raise DeliaError(f"{where}: field '{field if field == 'instruction' else f'{field}[{i}].content'}': "
                             "the user's turn is empty")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        raise DeliaError(f"{where}: field '{field}': the first turn after the system prompt must be the user's")
    if need_answer and turns[-1]["role"] != "assistant":
        raise DeliaError(f"{where}: field '{field}': the last turn must be the assistant's answer")


def load_conversations(source: str | Path, need_answer: bool = True) -> list[list[dict]]:
    """All conversations of a source (`delia.data.sources`), validated."""
    return [m for _, m in load_located(source, need_answer)]


def load_located(source: str | Path, need_answer: bool = True) -> list[tuple[str, list[dict]]]:
    """(where, conversation) for every row of a source, validated; a source without rows is an error."""
    rows = [(where, to_messages(obj, where, need_answer)) for where, obj in read_source(str(source))]
    if not rows:
        raise DeliaError(f"{source}{'' if str(source).startswith('hf:') or Path(source).is_dir() else ':1'}: no rows")
    return rows
