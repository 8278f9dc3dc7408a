"""A conversation as training tokens: input ids, and labels only on what the assistant says."""

from __future__ import annotations

from ..errors import DeliaError

IGNORE = -100
"""The label of a token that carries no loss."""


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, open_end: bool = False) -> dict:
    """input_ids and labels of one conversation; labels are -100 except on the assistant turns
    (their text and the end-of-turn token that closes them). `open_end`: the last assistant turn was
    cut before it ended, so what closes it carries no label (its text still does)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DeliaError("the chat template does not render conversations prefix by prefix; "
                             "cannot find the assistant tokens to train on")
        spans.append((len(before), len(upto)))
    if open_end and spans:
        start = spans[-1][0]
        content = messages[max(i for i, m in enumerate(messages) if m["role"] == "assistant")]["content"].rstrip()
        end = full.find(content, start) if content else start
        if end < 0:
            raise DeliaError("the chat template changes the assistant's text; cannot find where a cut answer ends")
        spans[-1] = (start, end + len(content))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE
        for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return {"input_ids": enc["input_ids"][:max_length], "labels": labels[:max_length]}
