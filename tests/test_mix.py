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


def test_streamed_mix_equals_the_in_memory_mix(tmp_path):
    """mix_files (byte offsets, lines copied) gives mix_with_diverse's rows in its order; blank lines and
    rows past the ratio are skipped; too few rows is the same clear error."""
    import json

    from delia.data.mix import mix_files

    task, diverse = _rows(10, "t"), [{**r, "source": "diverse", "prompt_style": "plain"} for r in _rows(40, "dé")]
    path = tmp_path / "diverse.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in diverse]
    # a blank line, a whitespace line, CRLF endings, no newline at the end
    path.write_bytes(("\n".join(lines[:5]) + "\n\n  \n" + "\r\n".join(lines[5:])).encode())
    for ratio, seed in ((3, 7), (2.5, 1), (0, 3)):
        n = mix_files(task, path, ratio, seed, tmp_path / "mix.jsonl")
        streamed = [json.loads(line) for line in (tmp_path / "mix.jsonl").read_text(encoding="utf-8").splitlines()]
        expected = mix_with_diverse(task, diverse, ratio, seed)
        assert n == round(ratio * 10) and len(streamed) == len(expected)
        assert [(r["messages"], r["source"]) for r in streamed] == [(r["messages"], r["source"]) for r in expected]
    with pytest.raises(DeliaError, match="needs 50 diverse rows"):
        mix_files(task, path, 5, 0, tmp_path / "mix2.jsonl")
    assert not (tmp_path / "mix2.jsonl").exists()


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 20])
def test_line_offsets_across_blocks(tmp_path, block):
    from delia.data.mix import _line_offsets

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"a": 22}\r\n{"a": 333}')
    starts, ends = _line_offsets(path, 10, block=block)
    assert [path.read_bytes()[s:e] for s, e in zip(starts, ends)] == [b'{"a": 1}', b'{"a": 22}', b'{"a": 333}']
    assert len(_line_offsets(path, 2, block=block)[0]) == 2


def test_an_arm_that_needs_other_rows_builds_them_though_the_mix_ran(tmp_path):
    from delia.config import load_config
    from delia.pipeline import stage_mix, stage_task

    base = [f"run_dir={tmp_path}", "task.train_rows=8", "task.eval_rows=2"]
    cfg = load_config(None, base + ["arms=[untouched, facts]"])
    stage_task(cfg)
    stage_mix(cfg)
    assert not (tmp_path / "mix" / "common.jsonl").exists()
    more = load_config(None, base + ["arms=[untouched, facts, common]"])  # the common rows have no settings of their own
    assert stage_mix(more)["outputs"]["common_rows"] == 8 and (tmp_path / "mix" / "common.jsonl").exists()
    assert stage_mix(more)["outputs"]["facts_rows"] > 0  # and up to date the second time
