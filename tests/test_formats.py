import pytest

from delia import DeliaError
from delia.data.formats import load_conversations


@pytest.mark.parametrize("content, expected", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ('[{"instruction": "Do x", "input": "with y", "output": "done"}]',
     [{"role": "user", "content": "Do x\n\nwith y"}, {"role": "assistant", "content": "done"}]),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}',
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
])
def test_shapes(tmp_path, content, expected):
    p = tmp_path / "d.json"
    p.write_text(content)
    assert load_conversations(p) == [expected]


@pytest.mark.parametrize("content, message", [
    ("", ":1: the file is empty"),
    ('{"instruction": "q", "output": "a"}\n{"messages": [', ":2: invalid JSON"),
    ('{"messages": []}', ":1: field 'messages': empty conversation"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', ":1: field 'messages': the first turn"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', ":1: field 'messages[0].role'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "the last turn must be the assistant's"),
    ('{"text": "x"}', "no 'messages', 'prompt', 'conversations' or 'instruction' field"),
])
def test_bad_input_names_file_line_and_field(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DeliaError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_conversations(p)
    assert str(p) in str(e.value)


def test_not_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"messages": []}\n\xff\xfe')
    with pytest.raises(DeliaError, match=":2: not UTF-8"):
        load_conversations(p)
