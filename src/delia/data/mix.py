"""The `mix` stage: task rows plus `ratio` x as many diverse rows, shuffled with a seed, and what each
kind of trained arm trains on (`MIX_DATA`, one builder per `Arm.data`).

`mix_files` streams: the diverse file is indexed by byte offsets and its lines are copied into place,
so a million diverse rows mix in seconds within a few tens of MB (benchmarks/mix_throughput.py).
`mix_with_diverse` is the same mix over rows in memory: the same rows in the same order (the file
mix keeps any other keys the diverse rows carry).
"""

from __future__ import annotations

import json
import math
import os
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import RunConfig, config_dict, model_key
from ..errors import DeliaError
from ..runfolder import RunFolder, atomic_path, fingerprint, read_jsonl, write_jsonl
from .baselines import answer_opening, dmt_rows, facts_mix, prefilled_rewrite, rewrite_request, self_distilled_row


def diverse_count(ratio: float, n_task: int) -> int:
    """Diverse rows that go with `n_task` task rows at `ratio` (rounded half up)."""
    return math.floor(ratio * n_task + 0.5)


def _too_few(ratio: float, n_task: int, n_diverse: int, have: int) -> DeliaError:
    return DeliaError(f"mix.ratio {ratio:g} needs {n_diverse} diverse rows for {n_task} task rows, "
                      f"but only {have} were sampled; lower the ratio or sample more queries")


def mix_with_diverse(task_rows: list[dict], diverse_rows: list[dict], ratio: float, seed: int) -> list[dict]:
    """Every task row once and round(ratio * len(task_rows)) diverse rows (the first ones, in order),
    each tagged with `source`, shuffled together with `seed`."""
    n_diverse = diverse_count(ratio, len(task_rows))
    if n_diverse > len(diverse_rows):
        raise _too_few(ratio, len(task_rows), n_diverse, len(diverse_rows))
    rows = [{"messages": r["messages"], "source": "task"} for r in task_rows]
    rows += [{"messages": r["messages"], "source": "diverse"} for r in diverse_rows[:n_diverse]]
    return [rows[i] for i in _order(len(rows), seed)]


def _order(n: int, seed: int) -> list[int]:
    """The shuffle of `n` rows: shuffling indices draws as shuffling the rows themselves."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _line_offsets(path: Path, limit: int, block: int = 1 << 24) -> tuple[array, array]:
    """Byte offsets (start, end without the line break) of the first `limit` non-blank lines of a file,
    found block by block with numpy: the file is never read whole."""
    import numpy as np

    starts, ends = array("q"), array("q")
    base, carry = 0, b""
    with open(path, "rb") as f:
        while len(starts) < limit:
            data = f.read(block)
            if not data and not carry:
                break
            buf = carry + data
            view = np.frombuffer(buf, dtype=np.uint8)
            cuts = np.flatnonzero(view == 10)
            if not data:  # the last line has no newline
                cuts = np.append(cuts, len(buf)).astype(np.int64)
            if not len(cuts):  # no line ends in this block yet
                carry = buf
                continue
            begin = np.concatenate(([0], cuts[:-1] + 1)).astype(np.int64)
            end = cuts - (view[np.maximum(cuts - 1, 0)] == 13) * (cuts > begin)  # CRLF: drop the CR
            short = np.flatnonzero(end - begin < 8)  # blank or whitespace-only lines are skipped
            blank = [i for i in short.tolist() if not buf[begin[i] : end[i]].strip()]
            keep = np.ones(len(begin), dtype=bool)
            keep[blank] = False
            take = min(limit - len(starts), int(keep.sum()))
            starts.frombytes((begin[keep][:take] + base).tobytes())
            ends.frombytes((end[keep][:take] + base).tobytes())
            tail = int(cuts[-1]) + 1
            base, carry = base + tail, buf[tail:]
            if not data:
                break
    return starts, ends


def mix_files(task_rows: list[dict], diverse_path: Path, ratio: float, seed: int, out: Path) -> int:
    """`mix_with_diverse` from a diverse JSONL file (rows tagged `"source": "diverse"`, as `sample` writes
    them) into `out`, streaming: the diverse rows are never all in memory. Returns the diverse rows used."""
    n_diverse = diverse_count(ratio, len(task_rows))
    starts, ends = _line_offsets(diverse_path, n_diverse)
    if len(starts) < n_diverse:
        raise _too_few(ratio, len(task_rows), n_diverse, len(starts))
    task_lines = [json.dumps({"messages": r["messages"], "source": "task"}, ensure_ascii=False).encode() + b"\n"
                  for r in task_rows]
    n_task = len(task_lines)
    fd = os.open(diverse_path, os.O_RDONLY)
    pread = os.pread
    try:
        with atomic_path(out) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
            write = f.write
            for i in _order(n_task + n_diverse, seed):
                if i < n_task:
                    write(task_lines[i])
                else:
                    i -= n_task
                    line = pread(fd, ends[i] - starts[i], starts[i])
                    _check_diverse(line, diverse_path, starts[i])
                    write(line)
                    write(b"\n")
    finally:
        os.close(fd)
    return n_diverse


def _check_diverse(line: bytes, path: Path, offset: int) -> None:
    """A diverse line is copied as it is, so it is checked first: a JSON object with a list of messages."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        row = None
    if not (isinstance(row, dict) and isinstance(row.get("messages"), list)):
        with open(path, "rb") as f:
            n = f.read(offset).count(b"\n") + 1
        raise DeliaError(f"{path}:{n}: not a JSON object with messages; the file was changed after `sample` wrote "
                         "it: delete it and run sample again (its cache keeps the answers)")


# What each kind of trained arm trains on (`Arm.data`): one builder per kind, run by the mix stage.

def delia_task_rows(cfg: RunConfig) -> Path:
    """The training rows DELIA mixes: diversified if that stage is on, else the task's own."""
    run = RunFolder(cfg.run_dir)
    return run.diversified_train if cfg.diversify.paraphrases > 0 else run.task_train


def _mix_common(cfg: RunConfig, task_rows: list[dict]) -> dict:
    write_jsonl(RunFolder(cfg.run_dir).mix("common"), mix_with_diverse(task_rows, [], 0, cfg.seed))
    return {"common_rows": len(task_rows)}


def _mix_delia(cfg: RunConfig, task_rows: list[dict]) -> dict:
    run = RunFolder(cfg.run_dir)
    rows = read_jsonl(delia_task_rows(cfg))  # the diversified wordings when that stage is on
    n_diverse = mix_files(rows, run.diverse, cfg.mix.ratio, cfg.seed, run.mix("delia"))
    return {"delia_rows": len(rows) + n_diverse, "delia_diverse_rows": n_diverse}


def _mix_facts(cfg: RunConfig, task_rows: list[dict]) -> dict:
    rows, n_facts = facts_mix(task_rows, cfg.baselines, cfg.task, cfg.seed)
    write_jsonl(RunFolder(cfg.run_dir).mix("facts"), rows)
    return {"facts_rows": n_facts}


def _mix_dmt(cfg: RunConfig, task_rows: list[dict]) -> dict:
    run = RunFolder(cfg.run_dir)
    diverse = read_jsonl(run.diverse)[: diverse_count(cfg.mix.ratio, len(task_rows))]
    rows = dmt_rows(task_rows, diverse, cfg.baselines.dmt_task_fraction, cfg.seed)
    write_jsonl(run.mix("dmt"), rows)
    return {"dmt_rows": len(rows)}


def _mix_self_distilled(cfg: RunConfig, task_rows: list[dict]) -> dict:
    """SDFT's rows: each task answer rewritten by the untouched model (its reply pre-filled with the opening
    the answers share, unless `baselines.self_distill_prefill` is off), kept if the evaluator accepts it
    (`baselines.self_distilled_row`); greedy, through the generation cache (`mix/self_distilled_cache.jsonl`)."""
    from ..evaluate.formatted import answer_budget
    from ..model.backends import make_generator
    from ..model.generate import Request
    from ..model.loading import load_tokenizer, model_source
    from .generation_cache import generate_cached

    run = RunFolder(cfg.run_dir)
    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model.trust_remote_code)
    budget = answer_budget(tokenizer, task_rows, cfg.evaluate)
    opening, gap = answer_opening(task_rows) if cfg.baselines.self_distill_prefill else ("", "")

    def request(row: dict) -> Request:
        messages = rewrite_request(row)
        text = prefilled_rewrite(tokenizer, row, opening) if opening else ""
        return Request(key=fingerprint({"model": model_key(cfg.model), "prompt": messages, "prefill": opening,
                                        "max_new_tokens": budget}), messages=messages, text=text)

    requests = [request(r) for r in task_rows]
    run.stage("mix").mkdir(parents=True, exist_ok=True)
    answers, _ = generate_cached(requests, run.stage("mix") / "self_distilled_cache.jsonl",
                                 lambda: make_generator(cfg.model, cfg.generation, cfg.evaluate.batch_size),
                                 budget, 0.0, 1.0, cfg.seed, desc="self-distilled rewrites")
    lead = opening + gap if opening else ""
    rows = [self_distilled_row(r, lead + answers[q.key]["answer"], cfg.task) for r, q in zip(task_rows, requests)]
    write_jsonl(run.mix("self_distilled"), rows)
    kept = sum(r["rewritten"] for r in rows)
    if kept < len(rows):
        print(f"delia: self_distilled: {kept} of {len(rows)} rewrites passed the task's evaluator; the others train on "
              "their reference answers" + (" (with none kept the arm is common tuning)" if not kept else ""), flush=True)
    return {"self_distilled_rows": len(rows), "self_distilled_kept": kept}


def _mix_counterfactual(cfg: RunConfig, task_rows: list[dict]) -> dict:
    """DELIA's rows (the task rows once, `mix.ratio` x as many self-sampled rows) and the counterfactual rows
    of the training rows (`delia.data.counterfactual`), shuffled together with the seed."""
    from collections import Counter

    from .counterfactual import counterfactual_rows, row_key

    run = RunFolder(cfg.run_dir)
    rows = [{"messages": r["messages"], "source": "task"} for r in read_jsonl(delia_task_rows(cfg))]
    n_diverse = diverse_count(cfg.mix.ratio, len(rows))
    diverse = read_jsonl(run.diverse)[:n_diverse]  # as mix_files copies them: every key kept
    if len(diverse) < n_diverse:
        raise _too_few(cfg.mix.ratio, len(rows), n_diverse, len(diverse))
    extra = counterfactual_rows(task_rows, cfg, run.stage("mix"))
    evaluated = {row_key(r) for r in read_jsonl(run.task_eval)}
    if any(r["of"] in evaluated for r in extra):  # what an arm trains on is never what the evaluation tests
        raise DeliaError(f"{run.task_eval}: an evaluation row is among the training rows the counterfactual rows rewrite")
    rows += diverse + extra
    write_jsonl(run.mix("counterfactual"), [rows[i] for i in _order(len(rows), cfg.seed)])
    kinds = Counter(r.get("kind", r["source"]) for r in rows)
    return {"counterfactual_rows": len(rows), "counterfactual_kinds": dict(sorted(kinds.items()))}


@dataclass(frozen=True)
class MixData:
    build: Callable[[RunConfig, list[dict]], dict]
    """Writes mix/NAME.jsonl from the task rows; returns its figures for the manifest."""
    settings: Callable[[RunConfig], dict] = field(default=lambda cfg: {})
    """The settings it depends on beyond the ratio and the seed (part of the mix stage's key)."""


MIX_DATA = {
    "common": MixData(_mix_common),
    "facts": MixData(_mix_facts, lambda cfg: {"facts": {k: v for k, v in config_dict(cfg)["baselines"].items()
                                                        if k in ("facts", "rows_per_fact")}}),
    "dmt": MixData(_mix_dmt, lambda cfg: {"dmt_task_fraction": cfg.baselines.dmt_task_fraction}),
    "delia": MixData(_mix_delia),
    "self_distilled": MixData(_mix_self_distilled, lambda cfg: {"self_distilled": {
        "model": model_key(cfg.model), "backend": cfg.generation.backend, "evaluate": config_dict(cfg)["evaluate"],
        "prefill": cfg.baselines.self_distill_prefill,
        "task": config_dict(cfg)["task"]}}),
    "counterfactual": MixData(_mix_counterfactual, lambda cfg: {"counterfactual": {
        **config_dict(cfg)["counterfactual"], "sample": config_dict(cfg)["sample"], "model": model_key(cfg.model),
        "backend": cfg.generation.backend}}),
}
"""What each kind of trained arm trains on (`Arm.data`), built by the mix stage."""
