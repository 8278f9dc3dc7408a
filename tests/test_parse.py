import pytest

from delia.config import TaskConfig
from delia.evaluate.formatted import score
from delia.evaluate.parse import extract_object


@pytest.mark.parametrize("text, expected", [
    ("""{'thought': "The user's query", 'hallucination': 'no'}""", {"thought": "The user's query", "hallucination": "no"}),
    ('Sure, here it is: {"thought": "x", "hallucination": "yes"} Hope it helps.', {"thought": "x", "hallucination": "yes"}),
    ('{"thought": "a {nested} brace", "meta": {"a": 1}, "hallucination": "no"}',
     {"thought": "a {nested} brace", "meta": {"a": 1}, "hallucination": "no"}),
    ("{'thought': 'The user's question is fine', 'hallucination': 'no'}",
     {"thought": "The user's question is fine", "hallucination": "no"}),
    ("{\u201cthought\u201d: \u201csmart\u201d, \u201challucination\u201d: \u201cno\u201d}", {"thought": "smart", "hallucination": "no"}),
    ('first {"thought": "one"} then {"thought": "two", "hallucination": "no"}', {"thought": "one"}),
])
def test_extracts_earliest_object(text, expected):
    assert extract_object(text) == expected


@pytest.mark.parametrize("text", ["no object here", '{"thought": "cut short', "{not: valid: at all}", "[1, 2]"])
def test_unparseable_gives_none(text):
    assert extract_object(text) is None


def test_never_evaluates_code():
    assert extract_object("{'a': __import__('os').system('echo hacked')}") is None


def test_score_needs_required_keys_and_compares_labels():
    task = TaskConfig()
    ref = '{"thought": "t", "hallucination": "yes"}'
    assert score('{"thought": "x", "hallucination": "Yes."}', ref, task) == {"formatted": True, "attempted": True, "label": True}
    assert score('{"thought": "x", "hallucination": "no"}', ref, task) == {"formatted": True, "attempted": True, "label": False}
    # the object is opened with a required key: attempted, not formatted
    assert score('{"thought": "missing key"}', ref, task) == {"formatted": False, "attempted": True, "label": False}
    assert score("plain text", ref, task) == {"formatted": False, "attempted": False, "label": False}
