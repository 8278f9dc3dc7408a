"""One YAML config, one typed section per stage. Unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import DeliaError
from .arms import ARMS


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """A short name of an embedded model, a local Hugging Face folder, or a Hub id."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you turn it on."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training and generation: float32, bfloat16 or float16."""


@dataclass
class GenerationConfig:
    backend: Literal["local", "vllm", "openai"] = "local"
    """`local` (transformers, batched), `vllm` (vLLM offline engine, GPUs) or `openai` (any
    OpenAI-compatible chat completions server)."""
    base_url: str = ""
    """For `openai`: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    server_model: str = ""
    """For `openai`: the model name the server knows (default: model.name). To evaluate trained arms over
    HTTP, put `{arm}` in it: each arm asks for its own model (e.g. `delia serve --name delia --adapter ...`)."""
    api_key_env: str = ""
    """For `openai`: the name of the environment variable holding the API key (never the key itself)."""
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 120.0
    """Seconds per request before it counts as failed and is retried."""
    tensor_parallel_size: int = 1
    """For `vllm`: GPUs per model (tensor parallelism)."""
    gpu_memory_utilization: float = 0.9
    """For `vllm`: share of each GPU's memory the engine may take."""
    vllm_batch_size: int = 1024
    """For `vllm`: requests handed to the engine at once (and written to the cache together)."""


@dataclass
class TaskConfig:
    kind: Literal["formatted", "translation"] = "formatted"
    """`formatted` (answers are objects with required keys) or `translation` (scored with chrF++ and BLEU)."""
    direction: str = "en-is"
    """For `translation`: two language codes, source first (en-is, is-en, de-en, ...)."""
    dictionary: str = ""
    """For the `dipmt` arm: a {source-language word: [translations]} JSON (default: SOURCE/dictionary.json,
    Icelandic -> English, inverted for en-is)."""
    source: str = "demo"
    """`demo` (the built-in hallucination-check task) or a file: messages JSONL, alpaca or sharegpt JSON/JSONL;
    for `translation`, a folder from `delia data en-is`, a JSONL (source, target) / TSV file,
    `hf:NAME[:CONFIG]` (a Hugging Face dataset) or `sacrebleu:TESTSET`."""
    eval_source: str = ""
    """For `translation`: where the evaluation pairs come from, in the same forms (e.g. sacrebleu:wmt21);
    empty = the source's test part (for a single file, 2 x eval_rows of its pairs held out)."""
    train_rows: int = 48
    """Training rows: for `demo`, how many to generate; for a file, at most this many (0 = all not held out)."""
    eval_rows: int = 24
    """Evaluation rows per wording group (seen and held-out wordings); for a file, an upper bound."""
    heldout_wording_fraction: float = 0.2
    """For a file: the share of distinct instruction wordings whose rows are held out of training."""
    diversify: bool = True
    """Train on many wordings of the instruction. False = one fixed wording (the ablation)."""
    new_tokens: list[str] = field(default_factory=lambda: ["<sep>"])
    """Special tokens added to the tokenizer and trained (their embedding rows)."""
    description: str = "a JSON object with the keys thought and hallucination"
    """The prior description of what the new token stands for (used for `description` init and analyses)."""
    keywords: list[str] = field(default_factory=lambda: ["json", "thought"])
    """Words of the description whose hidden states the new token is compared with (token analyses)."""
    required_keys: list[str] = field(default_factory=lambda: ["thought", "hallucination"])
    """Keys the answer object must hold to count as correctly formatted."""
    label_key: str = "hallucination"
    """Key whose value is compared with the reference for label accuracy (empty = none)."""


@dataclass
class SampleConfig:
    queries: str = "alpaca_en_demo"
    """`alpaca_en_demo` (999 Alpaca queries from the LLaMA-Factory sdist on PyPI) or a file of queries."""
    prompt_style: Literal["plain", "reference"] = "plain"
    """`plain`: the query alone. `reference`: the dataset's answer in an earlier turn, then the query again."""
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 16
    max_queries: int = 0
    """0 = as many as `mix.ratio` needs."""


@dataclass
class DiversifyConfig:
    paraphrases: int = 0
    """Paraphrases asked per distinct training wording (0 = stage off; the task's own wordings are used)."""
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 96
    batch_size: int = 16
    min_similarity: float = 0.6
    """Keep a paraphrase only if its cosine similarity with the original is at least this..."""
    max_similarity: float = 0.98
    """...and at most this (near-copies add no diversity)."""


@dataclass
class MixConfig:
    ratio: float = 3.0
    """Diverse rows per task row (paper: 100 to 520)."""


@dataclass
class TrainConfig:
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 0
    """Effective batch (rows per optimizer step). 0 = the paper's rule: 64, or 16 under 256 rows."""
    micro_batch_size: int = 4
    """Rows per forward pass; the rest is gradient accumulation."""
    warmup_ratio: float = 0.03
    lr_scheduler: str = "constant_with_warmup"
    max_length: int = 512
    """Longer rows are truncated."""
    sampling: Literal["batch_rebalance", "random"] = "batch_rebalance"
    """How each optimizer step's rows are split into micro-batches: `batch_rebalance` (transformers'
    BatchRebalanceSampler: the step's rows grouped by length into micro-batches of balanced cost, so
    little compute goes to padding; the step's gradient is unchanged) or `random` (the Trainer's
    default: micro-batches in shuffled order, padded to their longest row). A step of one micro-batch
    on one process has nothing to rebalance and keeps the Trainer's order either way."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory (long rows, large models), slower steps."""
    save_steps: int = 50
    """Checkpoint every N optimizer steps (adapter, optimizer, data position), so a killed `train` resumes
    where it stopped; 0 = no checkpoints. Removed when training ends."""
    token_init: Literal["random", "mean", "description"] = "random"
    """Init of new token rows: `random` (as the paper), `mean` (of all embeddings), `description` (mean of its tokens)."""
    train_new_tokens: bool = True
    """Train the embedding rows of the new tokens (how: `new_token_mode`)."""
    new_token_mode: Literal["trainable_tokens", "lora", "full"] = "trainable_tokens"
    """`trainable_tokens` (only the new rows, peft trainable_token_indices), `lora` (a LoRA on the
    embedding, as the paper's reference code) or `full` (the whole embedding, peft modules_to_save)."""
    new_token_lr: float = 0.0
    """A separate learning rate for the embedding parameters that train (0 = learning_rate)."""


@dataclass
class EvaluateConfig:
    batch_size: int = 16
    max_new_tokens: int = 0
    """0 = 1.5x the longest reference answer in tokens (answers must be able to finish)."""


NEGATED = (
    "Do not use the {token} format; answer in one plain sentence.",
    "Answer in plain prose, not in the {token} format.",
    "Ignore {token} and reply with one ordinary sentence, without braces or keys.",
    "Do NOT follow the {token} format: just say it in your own words.",
)
"""The negated control's instructions, written before any arm's answer was read and kept fixed."""


@dataclass
class ControlsConfig:
    """What tuning costs and whether the new token became a switch (formatted tasks; see
    `delia.evaluate.controls` and `delia.analysis.drift`)."""

    rows: int = 12
    """Evaluation rows each control is built from (half held-out wordings, half seen); 0 = no controls."""
    negated: list[str] = field(default_factory=lambda: list(NEGATED))
    """Instructions for the `negated` control ({token} = the new token), taken in turn row by row."""
    other_token: str = "<ctl>"
    """The `other token` control's token: added like the new tokens but never trained."""
    general_queries: int = 64
    """General queries held out of `sample` (from the end of its query source) for drift and leakage; 0 = none."""
    general_max_new_tokens: int = 32
    """New tokens per answer to a general query (the untouched model's answers and each arm's), and of each
    reference answer scored for NLL: enough to see whether an answer opens the task's object, and short
    enough that the demo's costs stay within minutes."""
    batch_size: int = 16


@dataclass
class BaselinesConfig:
    icl_k: int = 3
    """`icl` arm: training rows shown before each evaluation prompt."""
    arithmetic_lambda: float = 1.0
    """`arithmetic` arm: lambda in M_desc + lambda (M_desc - M_plain)."""
    arithmetic_lambdas: list[float] = field(default_factory=list)
    """`arithmetic` arm: when set, lambdas to choose from by format accuracy on 16 training rows (this arm
    trains on nothing, so the training rows are its development set); replaces arithmetic_lambda."""
    neftune_alpha: float = 5.0
    """`neftune` arm: noise scale on the input embeddings during training (common instruction tuning + noise)."""
    facts: list[str] = field(default_factory=list)
    """`facts` arm: atomic facts about the new token (empty = from task.description and task.required_keys)."""
    rows_per_fact: int = 4
    """`facts` arm: question-answer rows made from each fact."""
    dipmt_words: int = 3
    """`dipmt` arm: dictionary hints per source sentence (its rarest words in the training sources)."""
    dmt_task_fraction: float = 0.125
    """`dmt` arm (stage 2): share of the task rows mixed back into the diverse rows."""


@dataclass
class SweepConfig:
    ratios: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0])
    """Diverse ratios tried by `delia sweep` (one epoch each) and `delia tune-ratio` (successive halving)."""
    rungs: int = 3
    """tune-ratio: rounds of halving; the last trains one epoch, each earlier one 1/eta as long."""
    eta: int = 2
    """tune-ratio: keep the best 1/eta of the candidates after each rung."""
    bootstrap: int = 1000
    """tune-ratio: paired bootstrap resamples of the held-out rows for the confidence of the pick."""
    budget: Literal["epoch", "steps"] = "epoch"
    """`epoch`: each ratio trains (a fraction of) its own epoch, as the paper (more diverse rows, more
    steps); `steps`: every ratio trains as many steps as the largest ratio's epoch (task rows repeat)."""


@dataclass
class RunConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    arms: list[str] = field(default_factory=lambda: ["untouched", "common", "delia", "common_equal_steps"])
    """Which rows the report holds: untouched, common (1 epoch), delia, common_equal_steps, and the
    baselines icl, init_random, init_mean, init_description, arithmetic, neftune, facts, dmt; common,
    neftune, facts and dmt also as ARM_equal_steps (as many optimizer steps as delia; dmt's two stages
    together). Every arm and its traits: `delia.arms.ARMS`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    diversify: DiversifyConfig = field(default_factory=DiversifyConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)


NEW_TOKEN_MODES = typing.get_args(typing.get_type_hints(TrainConfig)["new_token_mode"])


def _build(cls, data: Any, where: str, path: str):
    if not isinstance(data, dict):
        raise DeliaError(f"{path}: '{where}': expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        here = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise DeliaError(f"{path}: unknown key '{here}' (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, here, path)
        else:
            kwargs[key] = _check(value, hint, here, path)
    return cls(**kwargs)


def _check(value: Any, hint: Any, where: str, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:  # a fixed set of choices, declared with the field
        choices = typing.get_args(hint)
        if value in choices and isinstance(value, str):
            return value
        raise DeliaError(f"{path}: '{where}': expected one of {', '.join(choices)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise DeliaError(f"{path}: '{where}': expected a list, got {value!r}")
        return [_check(v, inner, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if hint is float and not isinstance(value, bool):
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept any number written as text.
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise DeliaError(f"{path}: '{where}': expected {hint.__name__}, got {value!r}")


def _validate(cfg: RunConfig, path: str) -> RunConfig:
    """What a field's type cannot say: arms known and fit for the task, and settings that go together."""
    for name in cfg.arms:
        if name not in ARMS:
            raise DeliaError(f"{path}: 'arms': unknown arm '{name}' (known: {', '.join(ARMS)})")
        if cfg.task.kind not in ARMS[name].task_kinds:
            raise DeliaError(f"{path}: 'arms': {name} is for {' or '.join(ARMS[name].task_kinds)} tasks "
                             f"(task.kind is {cfg.task.kind!r})")
    if cfg.task.kind == "translation" and cfg.task.source == "demo":
        raise DeliaError(f"{path}: 'task.source': a translation task reads pairs (e.g. data/en-is from `delia data en-is`)")
    if cfg.baselines.arithmetic_lambdas and cfg.task.kind != "formatted":
        raise DeliaError(f"{path}: 'baselines.arithmetic_lambdas': tuned by format accuracy, so formatted tasks only")
    if cfg.generation.backend == "openai" and not cfg.generation.base_url:
        raise DeliaError(f"{path}: 'generation.base_url': the openai backend needs the server's URL")
    if not cfg.sweep.ratios or min(cfg.sweep.ratios) < 0 or cfg.sweep.rungs < 1 or cfg.sweep.eta < 2:
        raise DeliaError(f"{path}: 'sweep': ratios must be a non-empty list of numbers >= 0, rungs >= 1, eta >= 2")
    for name, least in (("rows", 0), ("general_queries", 0), ("general_max_new_tokens", 1), ("batch_size", 1)):
        if getattr(cfg.controls, name) < least:
            raise DeliaError(f"{path}: 'controls.{name}': must be >= {least}, got {getattr(cfg.controls, name)}")
    if cfg.controls.other_token in cfg.task.new_tokens or not cfg.controls.other_token.strip():
        raise DeliaError(f"{path}: 'controls.other_token': must be a non-empty token other than the new tokens")
    if cfg.controls.rows and not all("{token}" in t for t in cfg.controls.negated) or not cfg.controls.negated:
        raise DeliaError(f"{path}: 'controls.negated': a non-empty list of instructions, each with {{token}}")
    if cfg.mix.ratio < 0:
        raise DeliaError(f"{path}: 'mix.ratio': must be >= 0, got {cfg.mix.ratio}")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-3` -> (['train', 'learning_rate'], 0.001); values are read as YAML."""
    if "=" not in text:
        raise DeliaError(f"--set {text}: expected KEY=VALUE, for example train.learning_rate=1e-3")
    key, value = text.split("=", 1)
    if not all(part.strip() for part in key.split(".")):
        raise DeliaError(f"--set {text}: '{key}' is not a setting; expected KEY=VALUE, for example train.learning_rate=1e-3")
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise DeliaError(f"--set {text}: the value is not valid YAML: {getattr(e, 'problem', e)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when path is None) and apply `a.b=value` overrides. An error
    names the file and line of the bad key (or the --set that gave it)."""
    data: dict = {}
    where = str(path) if path else "<defaults>"
    lines: dict[str, str] = {}
    if path:
        data, lines = read_yaml(path, "config")
        data = data or {}
    if not isinstance(data, dict):
        raise DeliaError(f"{where}:1: expected a mapping of settings at the top level, got {type(data).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise DeliaError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
        lines[".".join(keys)] = f"--set {text}:"
    try:
        return _validate(_build(RunConfig, data, "", where), where)
    except DeliaError as e:
        raise DeliaError(locate(str(e), where, lines)) from None


def read_yaml(path: str | Path, what: str) -> tuple[Any, dict[str, str]]:
    """A YAML file's data and `file:line` for each of its keys (see key_lines); an unreadable file or bad
    YAML is a one-line error with the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeliaError(f"{path}: cannot read {what}: {e}") from None
    try:
        data = yaml.safe_load(text)
        return data, {key: f"{path}:{line}" for key, line in key_lines(yaml.compose(text), "", str(path))}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DeliaError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(e, 'problem', e)}") from None


def key_lines(node, prefix: str = "", path: str = ""):
    """(dotted key, 1-based line) for every key of a composed YAML document (`runs[1].name` inside lists);
    a key given twice in one mapping is an error (YAML would keep the last one silently)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield f"{prefix}[{i}]", item.start_mark.line + 1
            yield from key_lines(item, f"{prefix}[{i}]", path)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                dotted = f"{prefix}.{key.value}" if prefix else key.value
                line = key.start_mark.line + 1
                if dotted in seen:
                    raise DeliaError(f"{path}:{line}: '{dotted}' is given twice (first on line {seen[dotted]})")
                seen[dotted] = line
                yield dotted, line
                yield from key_lines(value, dotted, path)


def locate(message: str, where: str, lines: dict[str, str]) -> str:
    """Put the line of the key a config error names after the file name: `c.yaml: 'train.lora_r': ...`
    becomes `c.yaml:3: 'train.lora_r': ...` (`--set train.lora_r=x: ...` when an override gave it)."""
    match = re.match(rf"{re.escape(where)}: (?:unknown key )?'([^']+)'", message)
    if not match:
        return message
    named = key = match.group(1)
    while key and key not in lines:  # runs[1].name, then runs[1], then runs, then nothing
        shorter = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)
        key = shorter if shorter != key else ""
    if not key:  # a section named as a whole: the first of its keys that was given
        key = next((k for k in lines if k.startswith((named + ".", named + "["))), "")
    if not key:
        return message
    at = lines[key]
    return (f"{at} " if at.startswith("--set") else f"{at}: ") + message[len(where) + 2:]


def config_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
