"""The built-in demo task: check an answer for hallucinations and reply in the `<sep>` format.

Every row is generated from facts the code checks itself (arithmetic, unit conversions, capitals), so
each label and each `thought` is right. The response is a JSON object with the keys `thought` and
`hallucination` ("yes" when the answer is wrong). Training rows use TRAIN_WORDINGS; evaluation uses
new facts with the same wordings (seen) and with HELDOUT_WORDINGS, which never occur in training and
describe `<sep>` in new words.
"""

from __future__ import annotations

import json
import random

DESCRIPTION = "a JSON object with the keys thought and hallucination"

_TRAIN_CHECKS = [
    "Check whether the answer contains a hallucination",
    "Decide if the answer above is hallucinated",
    "Judge whether the answer is factually wrong",
    "Tell me if the answer includes any hallucination",
    "Verify the answer against the question and say whether it hallucinates",
    "Examine the answer for hallucinations",
    "Determine whether the given answer is correct or a hallucination",
    "Assess the answer for made-up or false content",
]
_TRAIN_FORMATS = [
    "Follow the <sep> format.",
    "Answer in the <sep> format.",
    "Use the <sep> format for your reply.",
    "The format requirement is <sep>.",
    "Your response must follow <sep>.",
    "Format the output as <sep>.",
]
_HELDOUT_CHECKS = [
    "Is there anything invented or incorrect in that answer? Find out",
    "Please audit the reply above for false claims",
    "Look over the response and report whether it states something untrue",
    "Find out if the given answer is accurate or fabricated",
]
_HELDOUT_FORMATS = [
    "Write what you return in <sep> style.",
    "Shape your reply according to <sep>.",
    "Respond using the layout that <sep> stands for.",
]
TRAIN_WORDINGS = [f"{c}. {f}" for c in _TRAIN_CHECKS for f in _TRAIN_FORMATS]
HELDOUT_WORDINGS = [f"{c}. {f}" for c in _HELDOUT_CHECKS for f in _HELDOUT_FORMATS]

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"), ("Japan", "Tokyo", "Osaka"), ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"), ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Turkey", "Ankara", "Istanbul"), ("Switzerland", "Bern", "Zurich"), ("India", "New Delhi", "Mumbai"),
    ("China", "Beijing", "Shanghai"), ("Egypt", "Cairo", "Alexandria"), ("Kenya", "Nairobi", "Mombasa"),
    ("Morocco", "Rabat", "Casablanca"), ("Nigeria", "Abuja", "Lagos"), ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Norway", "Oslo", "Bergen"), ("Sweden", "Stockholm", "Gothenburg"), ("Poland", "Warsaw", "Krakow"),
    ("Portugal", "Lisbon", "Porto"), ("Iceland", "Reykjavik", "Akureyri"), ("Peru", "Lima", "Cusco"),
    ("Argentina", "Buenos Aires", "Cordoba"), ("Mexico", "Mexico City", "Guadalajara"),
    ("New Zealand", "Wellington", "Auckland"), ("South Korea", "Seoul", "Busan"), ("Greece", "Athens", "Thessaloniki"),
    ("Netherlands", "Amsterdam", "Rotterdam"), ("Scotland", "Edinburgh", "Glasgow"),
]
# (unit asked for, unit given, factor): "How many <to> are in <n> <from>?"
CONVERSIONS = [
    ("metres", "kilometres", 1000), ("minutes", "hours", 60), ("grams", "kilograms", 1000),
    ("seconds", "minutes", 60), ("hours", "days", 24), ("inches", "feet", 12), ("days", "weeks", 7),
    ("millilitres", "litres", 1000), ("centimetres", "metres", 100), ("months", "years", 12),
]


def _wrong(rng: random.Random, right: int) -> int:
    delta = rng.choice([1, 2, 3, 5, 10]) * rng.choice([-1, 1])
    return right + delta if right + delta >= 0 else right + abs(delta)


def _fact(rng: random.Random) -> tuple[str, str, str, str, str]:
    """(question, correct answer, given answer, what was asked, correct value text) of one random fact."""
    kind = rng.choice(["add", "sub", "mul", "convert", "capital"])
    if kind == "capital":
        country, capital, other = rng.choice(CAPITALS)
        q = f"What is the capital of {country}?"
        return q, capital, rng.choice([capital, other]), f"the capital of {country}", capital
    if kind == "convert":
        to, frm, factor = rng.choice(CONVERSIONS)
        n = rng.randint(2, 12)
        right = n * factor
        given = rng.choice([right, _wrong(rng, right)])
        return f"How many {to} are in {n} {frm}?", str(right), str(given), f"{n} {frm} in {to}", f"{right} {to}"
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == "sub":
        a, b = max(a, b), min(a, b)
    op, right = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("x", a * b)}[kind]
    given = rng.choice([right, _wrong(rng, right)])
    return f"What is {a} {op} {b}?", str(right), str(given), f"{a} {op} {b}", str(right)


def make_row(rng: random.Random, wording: str) -> dict:
    question, right, given, asked, value = _fact(rng)
    answer = given if not given.isdigit() else (f"{given}." if rng.random() < 0.5 else f"It is {given}.")
    ok = given == right
    thought = (
        f"The question asks for {asked}. The correct value is {value} and the answer gives {given}, "
        + ("so the answer is right." if ok else "so the answer is wrong.")
    )
    response = json.dumps({"thought": thought, "hallucination": "no" if ok else "yes"})
    user = f"Question: {question}\nAnswer: {answer}\n\n{wording}"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
            "wording": wording, "question": question}


def make_rows(n: int, wordings: list[str], seed: int, avoid: set[str] = frozenset()) -> list[dict]:
    """n rows cycling through `wordings` (so every wording is used), with questions not in `avoid`."""
    rng = random.Random(seed)
    rows, seen = [], set(avoid)
    order = list(wordings)
    rng.shuffle(order)
    while len(rows) < n:
        row = make_row(rng, order[len(rows) % len(order)])
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        rows.append(row)
    return rows
