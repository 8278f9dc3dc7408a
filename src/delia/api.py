"""The Python API (`import delia`): the whole chain, each stage by name, and the data alone.

    cfg = delia.load_config("configs/demo.yaml", mix={"ratio": 5})   # a file, a dict, or keywords
    report = delia.run(cfg)                                          # every stage; the report's path
    delia.stage("sample", cfg)                                       # one stage: what its manifest says
    diverse = delia.self_sample("alpaca_en_demo", n=64)              # datasets.Dataset of messages
    train = delia.mix(task_rows, diverse, ratio=3)                   # for your own SFTTrainer

Stages skip work that is up to date and resume after a crash, as on the command line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import GenerationConfig, MixConfig, ModelConfig, RunConfig, SampleConfig
from .config import check_load_arguments, section
from .config import load_config as _load
from .errors import DeliaError


def load_config(source: str | Path | dict | None = None, overrides: list[str] = (), **sections: dict) -> RunConfig:
    """A run's settings from a YAML file, a dict shaped as the YAML, or the defaults; `sections` are
    merged over them by section (`mix={"ratio": 5}`), then `overrides` (`"mix.ratio=5"`) apply. Checked
    as `delia run` checks a file."""
    check_load_arguments(source, overrides)
    if not sections:
        return _load(source, overrides)
    import copy

    from .config import read_yaml

    data = copy.deepcopy(source) if isinstance(source, dict) else (read_yaml(source, "config")[0] or {}) if source else {}
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return _load(data, overrides)


def run(cfg: RunConfig) -> Path:
    """The whole chain for the configured arms (as `delia run`); returns the report's path."""
    from .pipeline import run_all

    return run_all(cfg)


def stage(name: str, cfg: RunConfig, arm: str = "") -> dict:
    """One stage by name (task, diversify, sample, general, mix, train, export, evaluate, analyze, report);
    `arm` for train, export and evaluate. Returns what the stage wrote: its manifest (`outputs` holds the
    paths and figures), or the path it made (export, report)."""
    from . import pipeline

    stages = {"task": pipeline.stage_task, "diversify": pipeline.stage_diversify, "sample": pipeline.stage_sample,
              "general": pipeline.stage_general, "mix": pipeline.stage_mix, "analyze": pipeline.stage_analyze,
              "report": pipeline.stage_report}
    per_arm = {"train": pipeline.stage_train, "export": pipeline.stage_export, "evaluate": pipeline.stage_evaluate}
    if name in per_arm:
        if not arm:
            raise DeliaError(f"stage {name!r}: name the arm (arm='delia')")
        return per_arm[name](cfg, arm)
    if name not in stages:
        raise DeliaError(f"unknown stage {name!r} (known: {', '.join([*stages, *per_arm])})")
    return stages[name](cfg)


def _conversations(queries) -> list[list[dict]]:
    from .data.formats import to_messages
    from .data.queries import load_queries

    if isinstance(queries, (str, Path)):
        return load_queries(str(queries))[0]
    out = []
    for i, q in enumerate(queries):
        out.append([{"role": "user", "content": q}] if isinstance(q, str) else to_messages(
            q if isinstance(q, dict) else {"messages": q}, f"queries[{i}]", need_answer=False))
    return out


def self_sample(queries, model: str = "smollm2-135m-instruct", n: int = 0, max_new_tokens: int = 256,
                temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, folder: str | Path | None = None,
                cut_answers: str = "mask", backend: str = "local", batch_size: int = 16):
    """The model answers general queries in its own words (DELIA's diverse rows), as a `datasets.Dataset`
    with `messages`, `ended` (the answer ended by itself) and `open_end` columns. `queries`: a source
    (`alpaca_en_demo`, a file, `hf:...`), or a list of strings or conversations; `n`: rows wanted (0 =
    one per query). With `folder`, answers are cached there and a killed call resumes. A trainer that
    cannot mask a cut answer's end-of-turn (TRL's SFTTrainer) should ask for `cut_answers="drop"`."""
    from datasets import Dataset

    from .data.sample import sample_diverse
    from .runfolder import read_jsonl

    caller = "delia.self_sample"
    cfg = section(SampleConfig, {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                 "batch_size": batch_size, "cut_answers": cut_answers}, "sample", caller)
    section(RunConfig, {"seed": seed}, "", caller)
    model_cfg = section(ModelConfig, {"name": model}, "model", caller)
    gen_cfg = section(GenerationConfig, {"backend": backend}, "generation", caller)
    if backend == "openai":
        raise DeliaError(f"{caller}: 'generation.backend': openai needs a server; use delia.load_config and delia.stage")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DeliaError(f"{caller}: 'n': must be an integer >= 0, got {n!r}")
    conversations = _conversations(queries)
    if not conversations:
        raise DeliaError(f"{caller}: 'queries': no queries to answer")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(folder) if folder else Path(tmp)
        path, _ = sample_diverse(conversations, model_cfg, cfg, n or len(conversations), out, seed, gen_cfg)
        rows = read_jsonl(path)
    return Dataset.from_list([{"messages": r["messages"], "ended": r["ended"], "open_end": r.get("open_end", False)}
                              for r in rows])


def mix(task, diverse, ratio: float, seed: int = 0):
    """Every task row once and round(ratio x task rows) diverse rows, shuffled together (DELIA's mix), as
    a `datasets.Dataset` with `messages` and `source` (task or diverse). `task` and `diverse`: Datasets,
    lists of rows with `messages`, or sources (`task` may be a file of task rows)."""
    from datasets import Dataset

    from .data.formats import load_conversations
    from .data.mix import mix_with_diverse

    ratio = section(MixConfig, {"ratio": ratio}, "mix", "delia.mix").ratio
    section(RunConfig, {"seed": seed}, "", "delia.mix")

    def rows(data) -> list[dict]:
        if isinstance(data, (str, Path)):
            return [{"messages": m} for m in load_conversations(data)]
        return [{"messages": r["messages"]} for r in data]

    return Dataset.from_list(mix_with_diverse(rows(task), rows(diverse), ratio, seed))
