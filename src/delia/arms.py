"""The arms a run compares, as data: one entry per arm with its traits, one table of all arms.

A run is stages x arms. The stages read an arm's traits (what it trains on, what it continues from,
its budget rule, how it is prompted and decoded) and never its name, so adding an arm is one entry
here plus its own code where it has some: a data builder (`delia.data.mix.MIX_DATA`), a prompt rewrite
(`delia.data.baselines.PROMPTS`) or a decoder (`delia.model.arm.arm_generator`). See "How to add an arm"
in docs/arms.md.

This module imports nothing of delia's, so config, stages and reports can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EPOCH = "One epoch each (the paper's protocol)"
EQUAL_STEPS = "Equal optimizer steps"
COMPARISONS = (EPOCH, EQUAL_STEPS)
"""The report's tables, in order; each arm names the ones it appears in."""
REFERENCE = "delia"
"""The arm whose optimizer steps the equal-steps arms match; it closes every table."""
EQUAL_STEPS_SUFFIX = "_equal_steps"
ALL_BACKENDS = ("local", "ctranslate2", "vllm", "openai")


@dataclass(frozen=True)
class Arm:
    name: str
    """The arm's name in configs and run folders."""
    label: str
    """Its row label in reports."""
    data: str = ""
    """The mix file it trains on (`mix/DATA.jsonl`, built by `delia.data.mix.MIX_DATA[DATA]`); empty = untrained."""
    budget: Literal["none", "epoch", "reference_steps"] = "none"
    """`epoch`: one epoch of its own data; `reference_steps`: as many optimizer steps as the REFERENCE arm."""
    continues_from: str = ""
    """A trained arm whose adapter this one goes on training (a second stage); its steps count towards
    this arm's budget and its figures are added to this arm's."""
    needs_diverse: bool = False
    """Trains on self-sampled diverse rows: the run samples them."""
    neftune: bool = False
    """Noise on the input embeddings during training (`baselines.neftune_alpha`)."""
    distill: Literal["", "anchor", "token", "description"] = ""
    """A KL term to the untouched model during training (`delia.train.distill`): `anchor` on the diverse
    rows instead of their cross-entropy, `token` to the untouched model reading the token's description,
    `description` that alone (no cross-entropy)."""
    token_only: bool = False
    """Trains only the new tokens' embedding rows (peft's TrainableTokens), no LoRA."""
    continue_as: Literal["adapter", "tokens"] = "adapter"
    """With `continues_from`: `adapter` trains the first stage's adapter on; `tokens` starts a new LoRA from
    the first stage's token rows, which stay frozen (token first, then the task)."""
    gist: bool = False
    """Rows whose instruction holds the token train with a gist mask: what follows the token cannot attend to
    the instruction words before it (`delia.model.gist`)."""
    decoys: bool = False
    """Its rows hold decoy tokens (`counterfactual.decoys`): training adds them like the new tokens and
    never trains their rows."""
    token_init: str = ""
    """Untrained: the new tokens are added with this init and nothing is trained."""
    prompt: str = ""
    """A rewrite of the evaluation prompts (`delia.data.baselines.PROMPTS[PROMPT]`); empty = the rows as they are."""
    decoding: Literal["plain", "arithmetic", "steering", "gist"] = "plain"
    """`arithmetic`: model arithmetic over prompts with and without the description; `steering`: a steering
    vector added where the token stands (`delia.model.steering`); `gist`: the gist mask at generation too
    (`delia.model.gist`)."""
    task_kinds: tuple[str, ...] = ("formatted", "translation")
    backends: tuple[str, ...] = ALL_BACKENDS
    """Generation backends that can evaluate it."""
    comparisons: tuple[str, ...] = (EPOCH,)

    @property
    def trained(self) -> bool:
        return bool(self.data)

    @property
    def is_base_model(self) -> bool:
        """Untrained, nothing added, prompted and decoded as it is: the untouched model itself."""
        return not self.trained and not self.token_init and not self.prompt and self.decoding == "plain"

    @property
    def uses_baseline_settings(self) -> bool:
        """Its evaluation depends on the `baselines` section (prompt rewrite or decoding)."""
        return bool(self.prompt) or self.decoding in ("arithmetic", "steering")


def _equal_steps(arm: Arm, label: str) -> Arm:
    """The same arm trained for the REFERENCE arm's optimizer steps (the task rows repeat)."""
    return Arm(**{**arm.__dict__, "name": arm.name + EQUAL_STEPS_SUFFIX, "label": label,
                  "budget": "reference_steps", "comparisons": (EQUAL_STEPS,)})


_COMMON = Arm("common", "Common instruction tuning (1 epoch)", data="common", budget="epoch")
_NEFTUNE = Arm("neftune", "NEFTune (common + embedding noise, 1 epoch)", data="common", budget="epoch", neftune=True)
_FACTS = Arm("facts", "Fact-based injection (1 epoch)", data="facts", budget="epoch")
_TOKEN_DISTILLED = Arm("token_distilled", "Token distillation (CE + KL to the model reading the description, 1 epoch)",
                      data="common", budget="epoch", distill="token")
_SELF_DISTILLED = Arm("self_distilled", "Self-distilled targets (SDFT, 1 epoch)", data="self_distilled", budget="epoch",
                     task_kinds=("formatted",))
_COUNTERFACTUAL = Arm("counterfactual", "Counterfactual rows (DELIA's + the task's inputs without the token, 1 epoch)",
                      data="counterfactual", budget="epoch", needs_diverse=True, decoys=True, task_kinds=("formatted",))
_COUNTERFACTUAL_ANCHOR = Arm("counterfactual_anchor", "Counterfactual rows, KL-anchored (1 epoch)", data="counterfactual",
                             budget="epoch", needs_diverse=True, decoys=True, distill="anchor", task_kinds=("formatted",))
_GIST = Arm("gist", "Gist-masked counterfactual rows, KL-anchored (1 epoch; the mask in training and generation)",
             data="counterfactual", budget="epoch", needs_diverse=True, decoys=True, distill="anchor", gist=True,
             decoding="gist", backends=("local",), task_kinds=("formatted",))
_TOKEN_FIRST = Arm("token_first", "Token first, then the task (anchored counterfactual rows; both stages 1 epoch)",
                   data="counterfactual", budget="epoch", needs_diverse=True, decoys=True, distill="anchor",
                   continues_from="token_row", continue_as="tokens", task_kinds=("formatted",))
_DMT = Arm("dmt", "DMT (common, then diverse + some task rows; 1 epoch each)", data="dmt", budget="epoch",
           continues_from="common", needs_diverse=True)
_LOCAL = ("local",)

ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("untouched", "Untouched model"),
    Arm("icl", "In-context examples (untrained)", prompt="icl", backends=_LOCAL),
    Arm("dipmt", "DiPMT (dictionary hints, untrained)", prompt="dipmt", task_kinds=("translation",), backends=_LOCAL),
    Arm("init_random", "New token, random init (untrained)", token_init="random", backends=_LOCAL),
    Arm("init_mean", "New token, mean init (untrained)", token_init="mean", backends=_LOCAL),
    Arm("init_description", "New token, description init (untrained)", token_init="description", backends=_LOCAL),
    Arm("arithmetic", "Model arithmetic (untrained)", decoding="arithmetic", backends=_LOCAL),
    Arm("steering", "Steering vector at the token (untrained)", token_init="mean", decoding="steering", backends=_LOCAL,
        task_kinds=("formatted",)),
    _COMMON, _NEFTUNE, _FACTS, _DMT, _TOKEN_DISTILLED, _SELF_DISTILLED,
    # DELIA's rows, its diverse rows trained towards the untouched model's distribution instead of their
    # sampled answers: as many steps as DELIA by construction, so in both tables
    Arm("kl_anchor", "KL-anchored task rows (KL to the untouched model on DELIA's diverse rows)", data="delia",
        budget="epoch", needs_diverse=True, distill="anchor", comparisons=COMPARISONS),
    # the token as a switch: DELIA's rows and the untouched model's answers to the task's own inputs
    # without the token (`delia.data.counterfactual`), trained by cross-entropy or anchored by KL
    _COUNTERFACTUAL, _COUNTERFACTUAL_ANCHOR, _GIST,
    # after ProMoT: the token's row alone first, by KL to the untouched model reading the description (the
    # model frozen: prompts without the token stay the untouched model's), then LoRA on the anchored rows
    Arm("token_row", "The token's row alone, by KL to the untouched model reading the description (1 epoch)",
        data="common", budget="epoch", distill="description", token_only=True, task_kinds=("formatted",)),
    _TOKEN_FIRST,
    Arm("delia", "DELIA (1 epoch)", data="delia", budget="epoch", needs_diverse=True, comparisons=COMPARISONS),
    _equal_steps(_COMMON, "Common instruction tuning (DELIA's steps)"),
    _equal_steps(_NEFTUNE, "NEFTune (DELIA's steps)"),
    _equal_steps(_FACTS, "Fact-based injection (DELIA's steps)"),
    _equal_steps(_DMT, "DMT (both stages together DELIA's steps)"),
    _equal_steps(_TOKEN_DISTILLED, "Token distillation (DELIA's steps)"),
    _equal_steps(_SELF_DISTILLED, "Self-distilled targets (DELIA's steps)"),
    _equal_steps(_COUNTERFACTUAL, "Counterfactual rows (DELIA's steps)"),
    _equal_steps(_COUNTERFACTUAL_ANCHOR, "Counterfactual rows, KL-anchored (DELIA's steps)"),
    _equal_steps(_GIST, "Gist-masked counterfactual rows, KL-anchored (DELIA's steps)"),
    _equal_steps(_TOKEN_FIRST, "Token first, then the task (both stages together DELIA's steps)"),
)}
"""Every arm, in the order of the report's rows."""

def trained_arms() -> tuple[str, ...]:
    """The names of the arms that train, in table order."""
    return tuple(name for name, arm in ARMS.items() if arm.trained)


def label(name: str) -> str:
    """An arm's report label; other names (e.g. "untouched (mean init)") as they are."""
    return ARMS[name].label if name in ARMS else name


def comparison(title: str, present) -> list[str]:
    """The arms of one report table among `present`, in table order, the REFERENCE arm last."""
    names = [n for n, a in ARMS.items() if title in a.comparisons and n in present and n != REFERENCE]
    return names + ([REFERENCE] if REFERENCE in present and title in ARMS[REFERENCE].comparisons else [])


def training_order(arms) -> list[str]:
    """The trained arms among `arms`, each after the arms it takes steps or an adapter from."""
    order = [n for n in ARMS if n in arms and ARMS[n].trained]
    first = {REFERENCE} | {ARMS[n].continues_from for n in order}
    return [n for n in order if n in first] + [n for n in order if n not in first]


def missing_dependency(arms) -> str:
    """Why this set of arms cannot run (an arm without the arm it needs), or ''."""
    for name in arms:
        arm = ARMS[name]
        if arm.continues_from and arm.continues_from not in arms:
            return f"{name} needs the {arm.continues_from} arm (its first stage)"
        if arm.budget == "reference_steps" and REFERENCE not in arms:
            return f"{name} needs the {REFERENCE} arm (it matches {REFERENCE}'s optimizer steps)"
    return ""
