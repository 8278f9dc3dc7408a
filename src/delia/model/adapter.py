"""A trained arm's adapter, loaded for inference: the new tokens re-created exactly as in training,
then the saved LoRA attached. Training writes TOKENS_FILE beside the adapter (delia.train.sft)."""

from __future__ import annotations

import json
from pathlib import Path

from .tokens import add_new_tokens

TOKENS_FILE = "delia_tokens.json"
"""Which tokens the adapter's run added, with the init and seed that re-create their base rows."""


def load_adapter(model, tokenizer, adapter_dir: Path, trainable: bool = False):
    """Re-create the new tokens exactly as in training, then attach the saved adapter."""
    from peft import PeftModel

    meta = json.loads((Path(adapter_dir) / TOKENS_FILE).read_text())
    add_new_tokens(model, tokenizer, meta["tokens"], meta["init"], meta["description"], meta["seed"])
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable), tokenizer


def save_merged(model, tokenizer, adapter_dir: Path, folder: Path) -> None:
    """The base model with the adapter merged in and the new tokens in its vocabulary, saved as a plain
    Hugging Face model folder (whole or not at all)."""
    from ..runfolder import atomic_dir

    model, tokenizer = load_adapter(model, tokenizer, adapter_dir)
    with atomic_dir(folder) as tmp:
        model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
