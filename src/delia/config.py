"""One YAML config, one typed section per stage. Unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .arms import ARMS
from .errors import DeliaError


@dataclass(frozen=True)
class Range:
    """A number's domain, declared with its field: `lora_r: Annotated[int, AtLeastOne] = 16`."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    """The low end itself is outside (a learning rate above 0)."""

    def check(self, value, where: str, path: str) -> None:
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        if not (low_ok and (self.high is None or value <= self.high)):
            low = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low}"
            high = "" if self.high is None else f"<= {self.high}"
            raise DeliaError(f"{path}: '{where}': must be {' and '.join(x for x in (low, high) if x)}, got {value!r}")


class NonEmpty:
    """A string with a non-blank character, or a list with an item."""

    @staticmethod
    def check(value, where: str, path: str) -> None:
        if not (value.strip() if isinstance(value, str) else value):
            raise DeliaError(f"{path}: '{where}': must not be empty")


DEMO_TRAIN_ROWS = 48
"""Rows the built-in demo task generates when `task.train_rows` is 0."""
NonNegative = Range(0)
Positive = Range(0, open_low=True)
AtLeastOne = Range(1)
Share = Range(0, 1)
Seed = Range(0, 2**32 - 1)
Cosine = Range(-1, 1)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """A short name of an embedded model, a local Hugging Face folder, or a Hub id."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you turn it on."""
    chat_template: str = ""
    """A chat template for a model whose tokenizer has none (or to replace its own): a known name
    (`chatml`, `gemma`) or a Jinja file. Empty = the tokenizer's own."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for training and generation: `auto` (bfloat16 on a GPU that supports it, else float32),
    float32, bfloat16 or float16."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where every stage puts the model: `auto` (the GPU when there is one, else the CPU), cpu or cuda
    (training under `accelerate launch` places each process's copy itself)."""


@dataclass
class GenerationConfig:
    backend: Literal["local", "ctranslate2", "vllm", "openai"] = "local"
    """`local` (transformers, batched), `ctranslate2` (CTranslate2 on CPU or CUDA, the model converted
    once into the cache), `vllm` (vLLM offline engine, GPUs) or `openai` (any OpenAI-compatible chat
    completions server)."""
    compute_type: Literal["float32", "int8"] = "float32"
    """For `ctranslate2`: the weights' type. int8 is faster and moves the distribution a little (see README)."""
    workers: Annotated[int, NonNegative] = 0
    """For `ctranslate2`: parts of a batch decoded at once (0 = 2 on a CPU with 2 or more cores, 1 on CUDA);
    while sampling, each part holds its own copy of the model."""
    threads: Annotated[int, NonNegative] = 0
    """For `ctranslate2`: threads per worker (0 = the cores shared out among the workers)."""
    base_url: str = ""
    """For `openai`: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    server_model: str = ""
    """For `openai`: the model name the server knows (default: model.name). To evaluate trained arms over
    HTTP, put `{arm}` in it: each arm asks for its own model (e.g. `delia serve --name delia --adapter ...`)."""
    api_key_env: str = ""
    """For `openai`: the name of the environment variable holding the API key (never the key itself)."""
    concurrency: Annotated[int, AtLeastOne] = 8
    max_retries: Annotated[int, NonNegative] = 6
    timeout: Annotated[float, Positive] = 120.0
    """Seconds per request before it counts as failed and is retried."""
    tensor_parallel_size: Annotated[int, AtLeastOne] = 1
    """For `vllm`: GPUs per model (tensor parallelism)."""
    gpu_memory_utilization: Annotated[float, Range(0, 1, open_low=True)] = 0.9
    """For `vllm`: share of each GPU's memory the engine may take."""
    vllm_batch_size: Annotated[int, AtLeastOne] = 1024
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
    """`demo` (the built-in hallucination-check task) or a source of rows: a JSON / JSONL / parquet / CSV
    file, a `save_to_disk` folder or `hf:NAME[:CONFIG][@SPLIT]`, in messages, TRL prompt / completion,
    alpaca or sharegpt shape;
    for `translation`, a folder from `delia data en-is`, a JSONL (source, target) / TSV file,
    `hf:NAME[:CONFIG]` (a Hugging Face dataset) or `sacrebleu:TESTSET`."""
    eval_source: str = ""
    """For `translation`: where the evaluation pairs come from, in the same forms (e.g. sacrebleu:wmt21);
    empty = the source's test part (for a single file, 2 x eval_rows of its pairs held out)."""
    train_rows: Annotated[int, NonNegative] = 0
    """Training rows, at most: 0 = all (a source's rows not held out for evaluation; for `demo`, 48 generated)."""
    eval_rows: Annotated[int, AtLeastOne] = 24
    """Evaluation rows per wording group (seen and held-out wordings); for a file, an upper bound."""
    heldout_wording_fraction: Annotated[float, Range(0, 1)] = 0.2
    """For a file: the share of distinct instruction wordings whose rows are held out of training."""
    diversify: bool = True
    """Train on many wordings of the instruction. False = one fixed wording (the ablation)."""
    new_tokens: list[Annotated[str, NonEmpty]] = field(default_factory=lambda: ["<sep>"])
    """Special tokens added to the tokenizer and trained (their embedding rows)."""
    description: str = "a JSON object with the keys thought and hallucination"
    """The prior description of what the new token stands for (used for `description` init and analyses)."""
    keywords: list[str] = field(default_factory=lambda: ["json", "thought"])
    """Words of the description whose hidden states the new token is compared with (token analyses)."""
    metric: Literal["object", "exact", "regex"] = "object"
    """How a formatted answer is scored: `object` (its earliest {...} parses and holds `required_keys`;
    `label_key` compared), `exact` (the whole answer equals the reference, stripped) or `regex` (the whole
    answer matches `answer_pattern`; a named group `label` is compared with the reference's)."""
    answer_pattern: str = ""
    """For `metric: regex`: a Python regular expression the whole answer must match."""
    required_keys: list[str] = field(default_factory=lambda: ["thought", "hallucination"])
    """Keys the answer object must hold to count as correctly formatted."""
    label_key: str = "hallucination"
    """Key whose value is compared with the reference for label accuracy (empty = none)."""


ALPACA_DEMO = "alpaca_en_demo"
MAGPIE = "magpie"
"""Not a set: the model writes its own queries (`delia.data.magpie`)."""
BUILT_IN = {ALPACA_DEMO: 999, "dpo_en_demo": 295, "kto_en_demo": 297}
"""The built-in query sets of `sample.queries` (the LLaMA-Factory sdist's English demo sets, read by
`delia.data.queries`) and their queries: Alpaca rows as shipped; the DPO and KTO sets reduced to their
distinct first user turns (one multi-turn chat is one query)."""


def source_name(spec: str) -> str:
    """What a source names: a path, or the NAME of `hf:NAME[:CONFIG][@SPLIT]`."""
    return spec[3:].partition("@")[0].partition(":")[0] if spec.startswith("hf:") else spec


def query_parts(spec: str) -> list[str]:
    """The sources of a `sample.queries` value: comma-separated, read in that order."""
    return [p.strip() for p in str(spec).split(",")]


@dataclass
class SampleConfig:
    queries: str = "alpaca_en_demo"
    """`alpaca_en_demo` (999 Alpaca queries from the LLaMA-Factory sdist on PyPI; `dpo_en_demo` and
    `kto_en_demo` from the same sdist add 295 and 297), `magpie`, or a source of queries: a JSON / JSONL /
    parquet / CSV file, a `save_to_disk` folder or `hf:NAME[:CONFIG][@SPLIT]`. Several joined with commas
    (`dpo_en_demo,kto_en_demo,alpaca_en_demo`) are read in order, skipping a query an earlier one holds;
    the general queries for drift are held out from the end of the last."""
    prompt_style: Literal["plain", "reference"] = "plain"
    """`plain`: the query alone. `reference`: the dataset's answer in an earlier turn, then the query again."""
    max_new_tokens: Annotated[int, AtLeastOne] = 256
    temperature: Annotated[float, NonNegative] = 0.7
    top_p: Annotated[float, Range(0, 1, open_low=True)] = 0.95
    batch_size: Annotated[int, AtLeastOne] = 16
    max_queries: Annotated[int, NonNegative] = 0
    """0 = as many as `mix.ratio` needs."""
    cut_answers: Literal["mask", "drop", "keep"] = "mask"
    """An answer that reaches `max_new_tokens` did not end by itself: `mask` trains its text but not the
    end-of-turn after it (the model is not taught to stop mid-sentence), `drop` leaves it out and asks
    further queries instead (as for an empty answer), `keep` trains it as if whole."""


@dataclass
class DiversifyConfig:
    paraphrases: Annotated[int, NonNegative] = 0
    """Paraphrases asked per distinct training wording (0 = stage off; the task's own wordings are used)."""
    temperature: Annotated[float, NonNegative] = 0.9
    top_p: Annotated[float, Range(0, 1, open_low=True)] = 0.95
    max_new_tokens: Annotated[int, AtLeastOne] = 96
    batch_size: Annotated[int, AtLeastOne] = 16
    min_similarity: Annotated[float, Cosine] = 0.6
    """Keep a paraphrase only if its cosine similarity with the original is at least this..."""
    max_similarity: Annotated[float, Cosine] = 0.98
    """...and at most this (near-copies add no diversity)."""


@dataclass
class MixConfig:
    ratio: Annotated[float, NonNegative] = 3.0
    """Diverse rows per task row (paper: 100 to 520)."""


TRACKING = ("report_to", "run_name", "project")
"""Train settings that only say where logs go: not part of a stage's key."""


@dataclass
class TrainConfig:
    lora_r: Annotated[int, AtLeastOne] = 16
    lora_alpha: Annotated[int, AtLeastOne] = 16
    lora_dropout: Annotated[float, Range(0, 1)] = 0.05
    lora_variant: Literal["lora", "dora", "rslora"] = "lora"
    """`lora` (the paper's), `dora` (weight-decomposed, peft use_dora) or `rslora` (rank-stabilised
    scaling alpha / sqrt(r), peft use_rslora); for every arm that trains."""
    target_modules: Annotated[list[Annotated[str, NonEmpty]], NonEmpty] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: Annotated[float, Positive] = 2e-4
    epochs: Annotated[float, Positive] = 1.0
    batch_size: Annotated[int, NonNegative] = 0
    """Effective batch (rows per optimizer step). 0 = the paper's rule: 64, or 16 under 256 rows."""
    micro_batch_size: Annotated[int, AtLeastOne] = 4
    """Rows per forward pass; the rest is gradient accumulation."""
    warmup_ratio: Annotated[float, Range(0, 1)] = 0.03
    lr_scheduler: Literal["constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt"] = "constant_with_warmup"
    """The learning-rate schedule (transformers' SchedulerType names that need no further settings)."""
    max_length: Annotated[int, Range(8)] = 512
    """Longer rows are truncated."""
    sampling: Literal["batch_rebalance", "random"] = "batch_rebalance"
    """How each optimizer step's rows are split into micro-batches: `batch_rebalance` (transformers'
    BatchRebalanceSampler: the step's rows grouped by length into micro-batches of balanced cost, so
    little compute goes to padding; the step's gradient is unchanged) or `random` (the Trainer's
    default: micro-batches in shuffled order, padded to their longest row). A step of one micro-batch
    on one process has nothing to rebalance and keeps the Trainer's order either way."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory (long rows, large models), slower steps."""
    save_steps: Annotated[int, NonNegative] = 50
    """Checkpoint every N optimizer steps (adapter, optimizer, data position), so a killed `train` resumes
    where it stopped; 0 = no checkpoints. Removed when training ends."""
    token_init: Literal["random", "mean", "description"] = "random"
    """Init of new token rows: `random` (as the paper), `mean` (of all embeddings), `description` (mean of its tokens)."""
    train_new_tokens: bool = True
    """Train the embedding rows of the new tokens (how: `new_token_mode`)."""
    new_token_mode: Literal["trainable_tokens", "lora", "full"] = "trainable_tokens"
    """`trainable_tokens` (only the new rows, peft trainable_token_indices), `lora` (a LoRA on the
    embedding, as the paper's reference code) or `full` (the whole embedding, peft modules_to_save)."""
    report_to: list[Literal["tensorboard", "trackio", "wandb"]] = field(default_factory=list)
    """Trackers that receive the training logs, as the Trainer's report_to (empty = none, the default: all
    stays local). tensorboard writes to the arm's train folder (`tensorboard/`)."""
    run_name: str = ""
    """The run's name in the trackers (default: the run folder's name and the arm)."""
    project: str = "delia"
    """The project the trackers file the runs under (trackio, wandb)."""
    new_token_lr: Annotated[float, NonNegative] = 0.0
    """A separate learning rate for the embedding parameters that train (0 = learning_rate)."""


@dataclass
class EvaluateConfig:
    batch_size: Annotated[int, AtLeastOne] = 16
    max_new_tokens: Annotated[int, NonNegative] = 0
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

    rows: Annotated[int, NonNegative] = 12
    """Evaluation rows each control is built from (half held-out wordings, half seen); 0 = no controls."""
    negated: list[str] = field(default_factory=lambda: list(NEGATED))
    """Instructions for the `negated` control ({token} = the new token), taken in turn row by row."""
    other_token: Annotated[str, NonEmpty] = "<ctl>"
    """The `other token` control's token: added like the new tokens but never trained."""
    general_queries: Annotated[int, NonNegative] = 64
    """General queries held out of `sample` (from the end of its query source) for drift and leakage; 0 = none."""
    general_max_new_tokens: Annotated[int, AtLeastOne] = 32
    """New tokens per answer to a general query (the untouched model's answers and each arm's), and of each
    reference answer scored for NLL: enough to see whether an answer opens the task's object, and short
    enough that the demo's costs stay within minutes."""
    batch_size: Annotated[int, AtLeastOne] = 16


TRAIN_NEGATIONS = (
    "Skip the {token} layout this time and write a normal sentence instead.",
    "There is no need for {token} here; a short plain reply will do.",
    "Reply without {token}: ordinary text only, no structured object.",
    "Leave out the {token} style and explain it briefly in words.",
)
"""The counterfactual arms' training negations: written apart from the evaluation's (`NEGATED`), and the
config refuses one that equals an evaluation negation."""


@dataclass
class CounterfactualConfig:
    """The counterfactual arms' own rows (`delia.data.mix`): for every training row, its instruction without
    the token, negated, and with a decoy token in its place, answered by the untouched model, and the bare
    token answered with the reference. What they train on stays apart from what the controls test."""

    negations: Annotated[list[str], NonEmpty] = field(default_factory=lambda: list(TRAIN_NEGATIONS))
    """Training negations ({token} = the new token), taken in turn row by row; never a `controls.negated` one."""
    decoys: Annotated[list[str], NonEmpty] = field(default_factory=lambda: ["<dcy>", "<alt>", "<fmt>"])
    """Decoy tokens put in the new token's place, taken in turn row by row: added like the new tokens and
    never trained; never `controls.other_token` or a new token."""
    kinds: Annotated[list[Literal["plain", "negated", "decoy", "bare"]], NonEmpty] = field(
        default_factory=lambda: ["plain", "negated", "decoy", "bare"])
    """Which variants of each training row to add: `plain` (the instruction without its token sentences),
    `negated`, `decoy` (answered by the untouched model) and `bare` (the token alone, answered with the
    reference)."""


@dataclass
class BaselinesConfig:
    icl_k: Annotated[int, NonNegative] = 3
    """`icl` arm: training rows shown before each evaluation prompt."""
    arithmetic_lambda: float = 1.0
    """`arithmetic` arm: lambda in M_desc + lambda (M_desc - M_plain)."""
    arithmetic_lambdas: list[float] = field(default_factory=list)
    """`arithmetic` arm: when set, lambdas to choose from by format accuracy on 16 training rows (this arm
    trains on nothing, so the training rows are its development set); replaces arithmetic_lambda."""
    neftune_alpha: Annotated[float, NonNegative] = 5.0
    """`neftune` arm: noise scale on the input embeddings during training (common instruction tuning + noise)."""
    facts: list[str] = field(default_factory=list)
    """`facts` arm: atomic facts about the new token (empty = from task.description and task.required_keys)."""
    rows_per_fact: Annotated[int, AtLeastOne] = 4
    """`facts` arm: question-answer rows made from each fact."""
    dipmt_words: Annotated[int, NonNegative] = 3
    """`dipmt` arm: dictionary hints per source sentence (its rarest words in the training sources)."""
    dmt_task_fraction: Annotated[float, Share] = 0.125
    """`dmt` arm (stage 2): share of the task rows mixed back into the diverse rows."""
    kl_anchor_beta: Annotated[float, NonNegative] = 1.0
    """`kl_anchor` arm: weight of the KL term to the untouched model on the diverse rows."""
    token_distill_beta: Annotated[float, NonNegative] = 1.0
    """`token_distilled` arm: weight of the KL term to the untouched model reading the description."""
    token_row_lr: Annotated[float, NonNegative] = 0.0
    """`token_row` arm (and the first stage of `token_first`): the learning rate of the token's row when it
    trains alone (0 = train.learning_rate; prompt tuning, which trains only such rows, uses far larger ones)."""
    self_distill_prefill: bool = True
    """`self_distilled` arms: start the rewrite's reply with the opening every reference answer shares
    (the format's scaffold, e.g. `{"thought": "`), so a small model rewrites in the format rather than in
    prose; false: the reply is the model's from its first token. Not with the openai backend."""


@dataclass
class SweepConfig:
    ratios: Annotated[list[Annotated[float, NonNegative]], NonEmpty] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0])
    """Diverse ratios tried by `delia sweep` (one epoch each) and `delia tune-ratio` (successive halving)."""
    rungs: Annotated[int, AtLeastOne] = 3
    """tune-ratio: rounds of halving; the last trains one epoch, each earlier one 1/eta as long."""
    eta: Annotated[int, Range(2)] = 2
    """tune-ratio: keep the best 1/eta of the candidates after each rung."""
    bootstrap: Annotated[int, AtLeastOne] = 1000
    """tune-ratio: paired bootstrap resamples of the held-out rows for the confidence of the pick."""
    budget: Literal["epoch", "steps"] = "epoch"
    """`epoch`: each ratio trains (a fraction of) its own epoch, as the paper (more diverse rows, more
    steps); `steps`: every ratio trains as many steps as the largest ratio's epoch (task rows repeat)."""


@dataclass
class RunConfig:
    run_dir: Annotated[str, NonEmpty] = "runs/demo"
    seed: Annotated[int, Seed] = 0
    arms: Annotated[list[str], NonEmpty] = field(default_factory=lambda: ["untouched", "common", "delia", "common_equal_steps"])
    """Which rows the report holds: untouched, common (1 epoch), delia, common_equal_steps, and the
    baselines icl, init_random, init_mean, init_description, arithmetic, neftune, facts, dmt, the rivals
    kl_anchor, self_distilled, token_distilled, and the switch arms counterfactual, counterfactual_anchor;
    most also as ARM_equal_steps (as many optimizer steps as delia; dmt's two stages together). Every arm
    and its traits: `delia.arms.ARMS`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    diversify: DiversifyConfig = field(default_factory=DiversifyConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)


NEW_TOKEN_MODES = typing.get_args(typing.get_type_hints(TrainConfig)["new_token_mode"])
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
"""What `train.report_to` needs installed, by tracker."""
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Gemma's turn format: the assistant is the `model`; a system prompt opens the first user turn
    "gemma": ("{{ bos_token }}{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
              "{% for message in messages if message['role'] != 'system' %}"
              "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
              "{% if loop.first %}{{ system }}{% endif %}{{ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
}
"""Chat templates known by name (`model.chat_template`); anything else is read as a Jinja file."""
VIRTUAL_ROOTS = ("/dev", "/proc", "/sys")
"""Folders of the kernel's own, never a run folder."""


def effective_batch(cfg: TrainConfig, n_rows: int) -> int:
    """The paper's rule unless set: 64, or 16 under 256 rows."""
    if cfg.batch_size:
        return cfg.batch_size
    return 64 if n_rows >= 256 else 16


def plan_batches(cfg: TrainConfig, n_rows: int, processes: int) -> tuple[int, int, int]:
    """(global batch, micro-batch per process, accumulation steps): the global batch is kept whatever
    the number of processes; one line when the micro-batches cannot make it up."""
    batch = effective_batch(cfg, n_rows)
    micro = max(1, min(cfg.micro_batch_size, batch // processes))
    if batch % (micro * processes):
        raise DeliaError(f"'train.batch_size': {batch} is not a multiple of train.micro_batch_size {micro} x "
                         f"{processes} process{'es' if processes > 1 else ''}")
    return batch, micro, batch // (micro * processes)


def section(cls, data: dict, where: str, caller: str):
    """One config section (or the run's top level: `RunConfig`, where '') built from `data` and checked
    against the same types and domains as a config file; errors name `caller` and the field."""
    return _build(cls, data, where, caller)


def _build(cls, data: Any, where: str, path: str):
    if not isinstance(data, dict):
        raise DeliaError(f"{path}: '{where}': expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
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
    if origin is Annotated:  # a type and its domain
        base, *rules = typing.get_args(hint)
        value = _check(value, base, where, path)
        for rule in rules:
            rule.check(value, where, path)
        return value
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
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is not None and math.isfinite(number):
            return number
        if number is not None or isinstance(value, (int, float)):
            raise DeliaError(f"{path}: '{where}': must be a finite number, got {value!r}")
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        if hint is str:
            check_text(value, where, path)
        return value
    raise DeliaError(f"{path}: '{where}': expected {hint.__name__}, got {value!r}")


def check_text(value: str, where: str, path: str) -> None:
    """Text a file, a path and a tokenizer can all hold: no NUL, no lone surrogate."""
    if "\x00" in value:
        raise DeliaError(f"{path}: '{where}': holds a NUL character at {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DeliaError(f"{path}: '{where}': holds a lone surrogate at {e.start}, not text") from None


def model_key(model: ModelConfig) -> str:
    """The model as a stage's key sees it: its name, and the chat template when one is given (a file by
    its content), so another template re-runs what it changes."""
    if not model.chat_template:
        return model.name
    import hashlib

    try:
        template = hashlib.sha256(Path(model.chat_template).read_bytes()).hexdigest()[:16]
    except OSError:
        template = model.chat_template  # a known name (an unreadable file fails when the model loads)
    return f"{model.name} [chat_template {template}]"


def train_settings(cfg: RunConfig) -> dict:
    """The train section as a stage's key sees it: without the tracking settings."""
    return {k: v for k, v in config_dict(cfg)["train"].items() if k not in TRACKING}


def _validate(cfg: RunConfig, path: str) -> RunConfig:
    """What a field's type cannot say: arms known and fit for the task, and settings that go together."""
    for name in cfg.arms:
        if name not in ARMS:
            raise DeliaError(f"{path}: 'arms': unknown arm '{name}' (known: {', '.join(ARMS)})")
        if cfg.task.kind not in ARMS[name].task_kinds:
            raise DeliaError(f"{path}: 'arms': {name} is for {' or '.join(ARMS[name].task_kinds)} tasks "
                             f"(task.kind is {cfg.task.kind!r})")
    check_run_dir(cfg.run_dir, path)
    if cfg.task.kind == "translation" and cfg.task.source == "demo":
        raise DeliaError(f"{path}: 'task.source': a translation task reads pairs (e.g. data/en-is from `delia data en-is`)")
    if cfg.task.metric == "regex":
        try:
            re.compile(cfg.task.answer_pattern)
        except re.error as e:
            raise DeliaError(f"{path}: 'task.answer_pattern': not a regular expression: {e}") from None
        if not cfg.task.answer_pattern:
            raise DeliaError(f"{path}: 'task.answer_pattern': metric regex needs a pattern the whole answer must match")
    known_rows = cfg.task.train_rows or (DEMO_TRAIN_ROWS if cfg.task.source == "demo" else 0)
    wanted = cfg.sample.max_queries or math.floor(cfg.mix.ratio * known_rows + 0.5)  # as data.mix.diverse_count
    parts = query_parts(cfg.sample.queries)
    if len(parts) > 1 and (MAGPIE in parts or "" in parts):
        raise DeliaError(f"{path}: 'sample.queries': {cfg.sample.queries!r}: join named sets or files with commas; "
                         "magpie generates its own queries and joins none")
    have = sum(BUILT_IN[p] for p in parts) if all(p in BUILT_IN for p in parts) else None
    if have is not None and any(ARMS[a].needs_diverse for a in cfg.arms) and wanted > have:
        why = (f"'sample.max_queries': asks for {wanted}" if cfg.sample.max_queries else
               f"'mix.ratio': {cfg.mix.ratio:g} x {known_rows} task rows asks for {wanted}")
        more = ("; add dpo_en_demo,kto_en_demo (295 and 297 more), " if len(parts) < len(BUILT_IN) else "; give ")
        raise DeliaError(f"{path}: {why} diverse rows, but sample.queries {cfg.sample.queries} has at most {have} "
                         f"queries{more}a larger query file (the full Alpaca set has 52,002) or ask for fewer")
    if cfg.baselines.arithmetic_lambdas and cfg.task.kind != "formatted":
        raise DeliaError(f"{path}: 'baselines.arithmetic_lambdas': tuned by format accuracy, so formatted tasks only")
    if (cfg.generation.backend == "openai" and cfg.baselines.self_distill_prefill
            and any(ARMS[a].data == "self_distilled" for a in cfg.arms)):
        raise DeliaError(f"{path}: 'baselines.self_distill_prefill': the openai backend cannot pre-fill a reply; "
                         "set it to false or use the local, ctranslate2 or vllm backend")
    if cfg.generation.backend == "openai" and not cfg.generation.base_url:
        raise DeliaError(f"{path}: 'generation.base_url': the openai backend needs the server's URL")
    if cfg.controls.other_token in cfg.task.new_tokens or not cfg.controls.other_token.strip():
        raise DeliaError(f"{path}: 'controls.other_token': must be a non-empty token other than the new tokens")
    if cfg.controls.rows and not all("{token}" in t for t in cfg.controls.negated) or not cfg.controls.negated:
        raise DeliaError(f"{path}: 'controls.negated': a non-empty list of instructions, each with {{token}}")
    _check_counterfactual(cfg, path)
    _check_training(cfg, path)
    for where, spec in (("task.source", cfg.task.source), ("task.eval_source", cfg.task.eval_source),
                        *(("sample.queries", part) for part in parts)):
        if (where != "task.eval_source" or spec) and not source_name(spec).strip():
            raise DeliaError(f"{path}: '{where}': {spec!r} names no source (a file, a folder, hf:NAME or a built-in set)")
    return cfg


def check_run_dir(run_dir: str, path: str, key: str = "run_dir", holds: str = "one run's files") -> None:
    """A run folder (or an experiment's, `key` naming its setting) is a folder of its own: not the root, the
    current folder or one above it, not under a file, not in the kernel's folders."""
    folder = Path(run_dir).expanduser().resolve()
    if folder == Path(folder.anchor) or folder in (Path.cwd(), *Path.cwd().parents):
        raise DeliaError(f"{path}: '{key}': {run_dir!r} is the filesystem root, the current folder or one "
                         f"above it; a run folder holds {holds} (e.g. runs/demo)")
    if any(folder == Path(v) or Path(v) in folder.parents for v in VIRTUAL_ROOTS):
        raise DeliaError(f"{path}: '{key}': {run_dir!r} is in the kernel's folders ({', '.join(VIRTUAL_ROOTS)})")
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise DeliaError(f"{path}: '{key}': {run_dir!r}: {p} is a file, not a folder")
            break


def _check_training(cfg: RunConfig, path: str) -> None:
    """Settings that train reads, checked before any stage runs: trackers installed, micro-batches that make
    up the batch, a chat template that compiles and renders."""
    for tracker in cfg.train.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise DeliaError(f"{path}: 'train.report_to': {tracker} is not installed (pip install {TRACKER_PACKAGES[tracker]})")
    processes = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    try:
        for rows in ((cfg.train.batch_size,) if cfg.train.batch_size else (16, 256)):  # the paper's rule: 16 or 64
            plan_batches(cfg.train, rows, processes)
    except DeliaError as e:
        raise DeliaError(f"{path}: {e}") from None
    if cfg.model.chat_template:
        _check_chat_template(cfg.model.chat_template, path)


def chat_template_text(spec: str) -> str:
    """A `model.chat_template`'s Jinja text: a known name's, or a file's; one line when it is neither."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    try:
        return Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeliaError(f"'model.chat_template': {spec!r} is neither a known name ({', '.join(CHAT_TEMPLATES)}) "
                         f"nor a readable Jinja file ({e.strerror if isinstance(e, OSError) else e})") from None


def _check_chat_template(spec: str, path: str) -> None:
    """The template compiles and renders a probe conversation as prompts and as training rows do."""
    try:
        template = chat_template_text(spec)
    except DeliaError as e:
        raise DeliaError(f"{path}: {e}") from None
    from transformers.utils.chat_template_utils import render_jinja_template

    probe = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    try:
        render_jinja_template([probe], chat_template=template, **special)
        render_jinja_template([probe[:1]], chat_template=template, add_generation_prompt=True, **special)
    except Exception as e:  # noqa: BLE001 - Jinja's syntax errors, undefined names, the template's own raise_exception
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DeliaError(f"{path}: 'model.chat_template': {spec!r} does not render a user and an assistant "
                         f"turn{where}: {type(e).__name__}: {str(e)[:200]}") from None


def _folded(text: str) -> str:
    """Text as the evaluation-apart check compares it: case and whitespace folded."""
    return " ".join(text.split()).casefold()


def _check_counterfactual(cfg: RunConfig, path: str) -> None:
    """What a counterfactual arm trains on is never what the controls test (whitespace and case folded)."""
    c = cfg.counterfactual
    evaluated = {_folded(t) for t in cfg.controls.negated}
    for i, text in enumerate(c.negations):
        if _folded(text) in evaluated:
            raise DeliaError(f"{path}: 'counterfactual.negations[{i}]': {text!r} is an evaluation negation "
                             "(controls.negated); a training negation must be another")
        if "{token}" not in text:
            raise DeliaError(f"{path}: 'counterfactual.negations[{i}]': {text!r} lacks {{token}}")
    taken = {_folded(cfg.controls.other_token)} | {_folded(t) for t in cfg.task.new_tokens}
    for i, token in enumerate(c.decoys):
        if _folded(token) in taken or not token.strip() or token != token.strip():
            raise DeliaError(f"{path}: 'counterfactual.decoys[{i}]': {token!r} must be a token other than "
                             "controls.other_token and the new tokens (the controls test those)")


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


def check_load_arguments(path, overrides) -> None:
    """`load_config`'s arguments are a path, a dict or None, and a list of KEY=VALUE strings."""
    if path is not None and not isinstance(path, (str, Path, dict)):
        raise DeliaError(f"load_config: expected a config file's path, a dict of settings or None, got "
                         f"{type(path).__name__} {path!r}"[:200])
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise DeliaError(f"load_config: overrides must be a list of KEY=VALUE strings, got {overrides!r}"[:200])


def load_config(path: str | Path | dict | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or a dict of settings shaped as the YAML, or the defaults when None) and apply
    `a.b=value` overrides. An error names the file and line of the bad key (or the --set that gave it)."""
    data: dict = {}
    check_load_arguments(path, overrides)
    where = "<dict>" if isinstance(path, dict) else str(path) if path else "<defaults>"
    lines: dict[str, str] = {}
    if isinstance(path, dict):
        import copy

        data = copy.deepcopy(path)
    elif path:
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
        node = yaml.compose(text)
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise DeliaError(f"{path}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases of aliases); "
                             "write the values out")
        data = yaml.safe_load(text)
        return data, {key: f"{path}:{line}" for key, line in key_lines(node, "", str(path))}
    except RecursionError:
        raise DeliaError(f"{path}: the YAML is nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DeliaError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(e, 'problem', e)}") from None


MAX_YAML_VALUES = 100_000
"""More values than a config or an experiment file could mean, once its aliases are expanded."""


def _expanded_size(node, sizes: dict) -> int:
    """How many values a composed YAML node stands for with every alias expanded, counted once per
    distinct node (an alias shares its anchor's node), so a billion laughs is counted, not walked."""
    if node is None:
        return 0
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that refers to itself counts once
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(c, sizes) for c in children)
    return sizes[id(node)]


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
    below = [k for k, at in lines.items() if at.startswith("--set") and k.startswith((named + ".", named + "["))]
    if key not in lines and below:  # an override that reached inside the named setting
        key = below[0]
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
