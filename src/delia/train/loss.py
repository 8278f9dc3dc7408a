"""The logits of a training step made only where a loss reads them: at the positions that predict an
answer token. The output layer (49,152 rows on SmolLM2, 262,144 on Gemma 3) and the softmax over it are
then computed on the answer tokens alone instead of on every prompt and padding position, which saves
time and memory and changes no logit (each row of the output is the same product)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..model.chat import IGNORE


def keeps_logits(model) -> bool:
    """Whether the model's forward takes a `logits_to_keep` mask (transformers' causal LMs of today do)."""
    inner = model
    while hasattr(inner, "module"):  # DDP, FSDP and DeepSpeed wrap the model they train
        inner = inner.module
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def answer_logits(model, inputs: dict, *label_sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, vocabulary] at the N positions whose next token is labelled in any of
    `label_sets` ([batch, width] each, IGNORE where there is no loss), in row-major order; index
    [batch, width] of each position's row among them, -1 where none). A model whose forward cannot
    keep a subset computes every position and the same rows are taken."""
    keep = torch.zeros_like(label_sets[0], dtype=torch.bool)
    for labels in label_sets:
        keep[:, :-1] |= labels[:, 1:] != IGNORE
    keep = keep.to(inputs["input_ids"].device)
    if keeps_logits(model):
        logits = model(**inputs, logits_to_keep=keep).logits.float()
    else:
        logits = model(**inputs).logits[keep].float()
    index = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
    index[keep] = torch.arange(int(keep.sum()), device=keep.device)
    return logits, index


def answer_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of the answer tokens as transformers' causal-LM loss gives it (summed over the
    micro-batch and divided by `num_items_in_batch`, the labelled tokens of the whole accumulated batch,
    when it is given; else the micro-batch's mean), from `answer_logits`."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits, index = answer_logits(model, inputs, labels)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).to(index.device)[index >= 0]
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / num_items_in_batch


def answer_trainer_class():
    """transformers' Trainer whose loss is `answer_loss` (imported late: transformers is heavy). The Trainer's
    own `compute_loss` still runs around it (what it passes the model, how it scales the loss for
    accumulation and over processes): only the model's forward is replaced."""
    from transformers import Trainer

    class AnswerTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            def forward(**inputs):  # num_items_in_batch is there when the Trainer gives it to the model
                return {"loss": answer_loss(model, inputs, inputs.pop("num_items_in_batch", None))}

            return super().compute_loss(forward, inputs, return_outputs, num_items_in_batch)

    return AnswerTrainer
