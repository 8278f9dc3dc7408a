"""Training with a KL term to the untouched model (the same weights with the adapter disabled):

- `anchor` (the `kl_anchor` arm): rows tagged `source: diverse` (and `counterfactual`: `ANCHORED`) carry
  no cross-entropy; on their answer tokens the loss is KL(untouched || model) on the same input, so the
  model's next-token distribution on general prompts stays where it was. DELIA's cross-entropy on self-sampled answers is a one-sample
  estimate of this anchor; the arm tells whether DELIA is more than a noisy version of it.
- `token` (the `token_distilled` arm, context distillation, Snell et al. 2022): every task row carries
  its cross-entropy and, on its answer tokens, KL(teacher || model), where the teacher is the untouched
  model given the instruction with each new token replaced by its description (`teacher_messages`).
- `description` (the first stage of `token_first`, after ProMoT, Wang et al. 2024): the same KL with no
  cross-entropy, so the token comes to stand for its description in the untouched model's own terms.

The loss of a micro-batch is (sum of cross-entropy over its answer tokens + beta x sum of KL over its
KL tokens) / (number of those tokens); the Trainer averages micro-batches over gradient accumulation.
"""

from __future__ import annotations

import torch

from ..config import TaskConfig
from ..conversation import replace_in_user_turns
from ..model.chat import IGNORE, tokenize_chat
from .loss import answer_logits

MODES = ("anchor", "token", "description")
ANCHORED = ("diverse", "counterfactual")
"""The rows `anchor` trains by KL to the untouched model instead of cross-entropy: the self-sampled ones and
the untouched model's answers to the task's inputs without the token (`delia.data.counterfactual`)."""


def teacher_messages(messages: list[dict], task: TaskConfig) -> list[dict]:
    """The conversation as the teacher sees it: each new token in the user turns replaced by the
    description, so the teacher reads what the token is meant to say."""
    return replace_in_user_turns(messages, dict.fromkeys(task.new_tokens, task.description))


def distill_example(tokenizer, row: dict, example: dict, mode: str, task: TaskConfig, max_length: int) -> dict:
    """A tokenized row with its KL fields: `kl_labels` (-100 but where the KL applies) and, for `token`,
    the teacher's own input ids and answer positions."""
    if mode == "anchor":
        if row.get("source") not in ANCHORED:
            return {**example, "kl_labels": [IGNORE] * len(example["labels"])}
        return {**example, "kl_labels": example["labels"], "labels": [IGNORE] * len(example["labels"])}
    teacher = tokenize_chat(tokenizer, teacher_messages(row["messages"], task), max_length)
    labels = example["labels"] if mode == "token" else [IGNORE] * len(example["labels"])  # description: KL alone
    return {**example, "labels": labels, "kl_labels": example["labels"], "teacher_input_ids": teacher["input_ids"],
            "teacher_labels": teacher["labels"]}


def pad_extra(features: list[dict], pad_id: int) -> dict:
    """The KL fields of a batch, padded on the right: kl_labels to the batch's input width (the inner
    collator pads input_ids and labels the same way), the teacher's inputs to their own width."""
    width = max(len(f["input_ids"]) for f in features)
    out = {"kl_labels": torch.tensor([f["kl_labels"] + [IGNORE] * (width - len(f["kl_labels"])) for f in features])}
    if "teacher_input_ids" in features[0]:
        tw = max(len(f["teacher_input_ids"]) for f in features)
        out["teacher_input_ids"] = torch.tensor([f["teacher_input_ids"] + [pad_id] * (tw - len(f["teacher_input_ids"]))
                                                 for f in features])
        out["teacher_attention_mask"] = torch.tensor([[1] * len(f["teacher_input_ids"]) + [0] * (tw - len(f["teacher_input_ids"]))
                                                      for f in features])
        out["teacher_labels"] = torch.tensor([f["teacher_labels"] + [IGNORE] * (tw - len(f["teacher_labels"]))
                                              for f in features])
    return out


def _predicting(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the positions whose logits predict a labelled token (position i - 1 for label i)."""
    return [torch.nonzero(row[1:] != IGNORE).flatten() for row in labels]


def distill_loss(model, inputs: dict, beta: float) -> tuple[torch.Tensor, int]:
    """(loss, tokens with a loss) of one micro-batch: see the module's docstring. The logits are made only
    where a loss reads them (`answer_logits`)."""
    kl_labels = inputs.pop("kl_labels")
    teacher_ids = inputs.pop("teacher_input_ids", None)
    teacher_mask = inputs.pop("teacher_attention_mask", None)
    teacher_labels = inputs.pop("teacher_labels", None)
    labels = inputs.pop("labels")
    logits, at = answer_logits(model, inputs, labels, kl_labels)
    logp = torch.log_softmax(logits, -1)
    ce_positions = _predicting(labels)
    ce = sum(-logp[at[b, p], labels[b, p + 1]].sum() for b, p in enumerate(ce_positions))
    n = sum(len(p) for p in ce_positions)
    with torch.no_grad(), model.disable_adapter():
        if teacher_ids is None:  # the anchor: the same input
            (teacher_logits, teacher_index), teacher_at = answer_logits(model, inputs, kl_labels), _predicting(kl_labels)
        else:
            teacher_logits, teacher_index = answer_logits(
                model, {"input_ids": teacher_ids, "attention_mask": teacher_mask}, teacher_labels)
            teacher_at = _predicting(teacher_labels)
    kl = logits.new_zeros(())
    for b, student_at in enumerate(_predicting(kl_labels)):
        k = min(len(student_at), len(teacher_at[b]))  # the same answer: aligned from its end
        if not k:
            continue
        target = torch.log_softmax(teacher_logits[teacher_index[b, teacher_at[b][-k:]]], -1)
        kl = kl + (target.exp() * (target - logp[at[b, student_at[-k:]]])).sum()
        n += k
    return (ce + beta * kl) / max(n, 1), n


def distill_trainer_class():
    """transformers' Trainer with `distill_loss` (imported late: transformers is heavy)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args, beta: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta = beta
            self.model_accepts_loss_kwargs = False  # the loss is a micro-batch mean: the Trainer averages

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = distill_loss(model, dict(inputs), self.beta)
            return (loss, None) if return_outputs else loss

    return DistillTrainer
