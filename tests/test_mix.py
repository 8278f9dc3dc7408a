import pytest

from delia import DeliaError
from delia.data.mix import mix_with_diverse


def _rows(n, tag):
    return [{"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(n)]


@pytest.mark.parametrize("ratio", [0, 1, 2.5, 3])
def test_ratio_is_exact(ratio):
    task, diverse = _rows(10, "t"), _rows(40, "d")
    rows = mix_with_diverse(task, diverse, ratio, seed=1)
    assert sum(r["source"] == "task" for r in rows) == 10
    assert sum(r["source"] == "diverse" for r in rows) == round(ratio * 10)
    # every task row exactly once
    assert sorted(r["messages"][0]["content"] for r in rows if r["source"] == "task") == sorted(f"t{i}" for i in range(10))


def test_seed_reproducible_and_shuffled():
    task, diverse = _rows(10, "t"), _rows(40, "d")
    a = mix_with_diverse(task, diverse, 3, seed=7)
    b = mix_with_diverse(task, diverse, 3, seed=7)
    c = mix_with_diverse(task, diverse, 3, seed=8)
    assert a == b
    assert a != c
    # task rows are spread through the mix, not left in one block
    positions = [i for i, r in enumerate(a) if r["source"] == "task"]
    assert positions != list(range(10))


def test_too_few_diverse_rows_is_a_clear_error():
    with pytest.raises(DeliaError, match="needs 30 diverse rows"):
        mix_with_diverse(_rows(10, "t"), _rows(5, "d"), 3, seed=0)
