"""The `train` stage: LoRA SFT with loss on assistant tokens only and trainable new-token rows.

Built on transformers' `Trainer` and peft, so the same code runs under `accelerate launch` (DDP,
DeepSpeed, FSDP; configs in configs/accelerate/): `train.batch_size` stays the global batch (the
accumulation steps shrink with the number of processes), only the main process writes, and the token
counts are summed over the processes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..config import TaskConfig, TrainConfig, plan_batches
from ..errors import DeliaError
from ..model.adapter import TOKENS_FILE, load_adapter
from ..model.chat import IGNORE, tokenize_chat
from ..model.gist import FIELD as GIST
from ..model.gist import gist_attention, gist_positions
from ..model.tokens import add_new_tokens
from ..runfolder import world, write_json
from .distill import distill_example, distill_trainer_class, pad_extra
from .loss import answer_trainer_class

COUNTS_FILE = "delia_counts.json"
KL_FIELDS = ("kl_labels", "teacher_input_ids", "teacher_labels")


def _counts_file(rank: int) -> str:
    return COUNTS_FILE if rank == 0 else f"delia_counts.rank{rank}.json"


def _sum_over_processes(values: list[int]) -> list[int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    # NCCL reduces only tensors on the GPU; gloo, those on the CPU
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _resumable_checkpoint(folder: Path, run_key: str) -> Path | None:
    """The newest whole checkpoint left by a killed run with the same settings and inputs (`run_key`), if
    any. A checkpoint is whole once this process's token counts are in it (written last); a newer one cut
    short by the kill is removed, the earlier whole one kept (`save_total_limit` 2 keeps it on disk).
    Checkpoints of other settings are removed."""
    if not folder.is_dir():
        return None
    key = folder / "run_key"
    rank, _ = world()
    if key.exists() and key.read_text() == run_key:
        steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
        for _, path in reversed(steps):
            if (path / _counts_file(rank)).exists() and (path / "trainer_state.json").exists():
                return path
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)  # cut short by the kill
        return None
    if rank == 0:
        shutil.rmtree(folder)
    return None


def embedding_module_name(model) -> str:
    target = model.get_input_embeddings()
    return next(name.split(".")[-1] for name, mod in model.named_modules() if mod is target)


class _CountingCollator:
    """Pads a batch and counts the tokens that go through training (all, and those with a loss).
    Batches are counted as they are consumed: the data loader collates one batch ahead. Rows with a gist
    (`delia.model.gist`) get the batch's 4D gist mask, in `mask_dtype`."""

    def __init__(self, tokenizer, accumulation: int, mask_dtype: torch.dtype = torch.float32):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
        self.mask_dtype = mask_dtype
        self.accumulation = accumulation
        self.start = {"step": 0, "tokens": 0, "loss_tokens": 0, "padded_tokens": 0}  # of a checkpoint resumed from
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, features):
        extra = [k for k in features[0] if k in KL_FIELDS]
        batch = self.inner([{k: v for k, v in f.items() if k not in KL_FIELDS and k != GIST} for f in features])
        with_loss = batch["labels"] != IGNORE
        if extra:  # a KL term (delia.train.distill): its tokens carry a loss too
            batch.update(pad_extra(features, self.inner.tokenizer.pad_token_id))
            with_loss |= batch["kl_labels"] != IGNORE
        self.batches.append((int(batch["attention_mask"].sum()), int(with_loss.sum()), batch["input_ids"].numel()))
        if GIST in features[0]:
            batch["attention_mask"] = gist_attention(batch["attention_mask"], [f[GIST] for f in features], self.mask_dtype)
        return batch

    def counts(self, step: int) -> dict:
        """Tokens, loss tokens and tokens computed with the padding, trained up to optimizer step `step`."""
        done = self.batches[: (step - self.start["step"]) * self.accumulation]
        return {"step": step, **{key: self.start.get(key, 0) + sum(b[i] for b in done)
                                 for i, key in enumerate(("tokens", "loss_tokens", "padded_tokens"))}}


def lora_config(cfg: TrainConfig, embed_name: str, new_ids: list[int], token_only: bool = False):
    """How the new tokens' rows train (`train.new_token_mode`; `token_only`: their rows alone, no LoRA):
    `trainable_tokens`: only their rows, through peft's trainable_token_indices (small adapter);
    `lora`: a LoRA on the whole embedding, as the paper's reference code;
    `full`: the whole embedding matrix trained and saved (peft modules_to_save)."""
    from peft import LoraConfig, TrainableTokensConfig

    if token_only:
        return TrainableTokensConfig(target_modules=[embed_name], token_indices=new_ids)
    mode = cfg.new_token_mode if cfg.train_new_tokens and new_ids else None
    targets = list(cfg.target_modules) + ([embed_name] if mode == "lora" else [])
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        task_type="CAUSAL_LM", use_dora=cfg.lora_variant == "dora", use_rslora=cfg.lora_variant == "rslora",
        trainable_token_indices={embed_name: new_ids} if mode == "trainable_tokens" else None,
        modules_to_save=[embed_name] if mode == "full" else None,
    )


def _separate_token_lr(model, cfg: TrainConfig, embed_name: str):
    """With `train.new_token_lr` set: AdamW with that learning rate for the embedding parameters
    (new-token rows, embedding LoRA or whole embedding) and `learning_rate` for the rest."""
    if not cfg.new_token_lr:
        return None
    embed, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (embed if ("trainable_tokens" in name or f".{embed_name}." in name) else rest).append(p)
    if not embed:
        raise DeliaError("train.new_token_lr is set but no embedding parameter is trained (train_new_tokens off?)")
    return torch.optim.AdamW, {"params": [{"params": rest}, {"params": embed, "lr": cfg.new_token_lr}],
                               "lr": cfg.learning_rate, "weight_decay": 0.0}


def _add_or_resume_tokens(model, tokenizer, cfg: TrainConfig, task: TaskConfig, seed: int,
                          resume_adapter: Path | None, untrained: list[str]):
    """The new tokens added with their init (then the `untrained` ones, the same way), or a saved adapter
    loaded to go on training (DMT's second stage). Returns (model, tokenizer, the ids of the tokens that
    train, their init, the seed of their init)."""
    if resume_adapter:
        meta = json.loads((Path(resume_adapter) / TOKENS_FILE).read_text())
        model, tokenizer = load_adapter(model, tokenizer, resume_adapter, trainable=True)
        trained = [t for t in meta["tokens"] if t not in meta.get("untrained", [])]
        return model, tokenizer, tokenizer.convert_tokens_to_ids(trained), meta["init"], meta["seed"]
    ids = add_new_tokens(model, tokenizer, task.new_tokens + list(untrained), cfg.token_init, task.description, seed)
    return model, tokenizer, ids[: len(task.new_tokens)], cfg.token_init, seed


def _first_stage_rows(model, adapter: Path, ids: list[int]) -> None:
    """Write the new tokens' rows as a first stage that trained them alone (`token_only`) left them into the
    input embedding (the same ids: every run adds the new tokens first, the same way)."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type") != "TRAINABLE_TOKENS" or config["token_indices"] != ids:
        raise DeliaError(f"{adapter}: not a first stage that trained the new tokens' rows alone (ids {ids})")
    embed = embedding_module_name(model)
    rows = next(v for k, v in load_file(adapter / "adapter_model.safetensors").items()
                if k.endswith(f"{embed}.trainable_tokens_delta"))
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = rows.to(device=weight.device, dtype=weight.dtype)


def _examples(tokenizer, rows: list[dict], max_length: int, distill: str = "", task: TaskConfig | None = None,
              gist: bool = False) -> list[dict]:
    """Tokenized rows that keep at least one assistant token after truncation (with their KL fields for a
    `distill` mode, see delia.train.distill, and their gist for `gist`, see delia.model.gist)."""
    tokenizer.padding_side = "right"
    pairs = [(r, tokenize_chat(tokenizer, r["messages"], max_length, r.get("open_end", False))) for r in rows]
    pairs = [(r, e) for r, e in pairs if any(label != IGNORE for label in e["labels"])]
    if gist:
        pairs = [(r, {**e, GIST: gist_positions(tokenizer, r["messages"], task.new_tokens, max_length)}) for r, e in pairs]
    examples = [distill_example(tokenizer, r, e, distill, task, max_length) if distill else e for r, e in pairs]
    if not examples:
        raise DeliaError("no training row has an assistant token left (raise train.max_length?)")
    return examples


def _resume_or_start(out_dir: Path, run_key: str, collator: _CountingCollator, loss_log: Path, rank: int) -> Path | None:
    """The checkpoint to go on from (its token counts and loss lines kept up to its step), or None for a
    fresh start (the loss log cleared, the run key written)."""
    checkpoint = _resumable_checkpoint(out_dir / "checkpoints", run_key)
    if checkpoint:
        counts = json.loads((checkpoint / _counts_file(rank)).read_text())
        collator.start = counts
        if rank == 0:
            kept = [line for line in loss_log.read_text().splitlines()
                    if json.loads(line)["step"] <= counts["step"]] if loss_log.exists() else []
            loss_log.write_text("".join(line + "\n" for line in kept))
            print(f"delia: resuming from {checkpoint.name}", flush=True)
    elif rank == 0:
        loss_log.unlink(missing_ok=True)
        (out_dir / "checkpoints").mkdir(exist_ok=True)
        (out_dir / "checkpoints" / "run_key").write_text(run_key)
    return checkpoint


def _log_callback(loss_log: Path, collator: _CountingCollator, rank: int):
    """Appends each step's loss to loss_log; every checkpoint keeps each process's token counts."""
    from transformers import TrainerCallback

    class LogLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and rank == 0:
                with open(loss_log, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "loss": logs["loss"],
                                        "lr": logs.get("learning_rate")}) + "\n")

        def on_save(self, args, state, control, **kw):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(folder / _counts_file(rank), collator.counts(state.global_step))

    return LogLoss()


def _trackers(cfg: TrainConfig, out_dir: Path) -> list:
    """transformers' TensorBoard callback, writing beside the adapter (the Trainer's own default is inside
    the checkpoints folder, removed when training ends)."""
    if "tensorboard" not in cfg.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    try:
        callback = TensorBoardCallback()
    except RuntimeError:
        raise DeliaError("train.report_to tensorboard: install it first (pip install tensorboard)") from None
    callback.logging_dir = str(out_dir / "tensorboard")
    return [callback]


def _training_arguments(cfg: TrainConfig, out_dir: Path, micro: int, accumulation: int, processes: int,
                        seed: int, max_steps: int, neftune_alpha: float, bf16: bool, on_cpu: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        logging_steps=1,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,  # the previous whole checkpoint survives a kill while the next one is written
        report_to=[r for r in cfg.report_to if r != "tensorboard"] or "none",  # tensorboard: a callback below
        run_name=cfg.run_name or out_dir.name,
        project=cfg.project,
        seed=seed,
        data_seed=seed,
        neftune_noise_alpha=neftune_alpha or None,
        remove_unused_columns=False,
        # one micro-batch a step (and one process) leaves nothing to rebalance: the Trainer's own order
        train_sampling_strategy=cfg.sampling if accumulation * processes > 1 else "random",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        dataloader_pin_memory=not on_cpu,  # pinned memory only helps copies to a GPU
        bf16=bf16,
        disable_tqdm=False,
        # on the CPU the Trainer must be told so (else it moves the model to a GPU, and refuses bf16);
        # several processes there talk over gloo, as NCCL needs GPUs
        **({"use_cpu": True, **({"ddp_backend": "gloo"} if processes > 1 else {})} if on_cpu else {}),
    )


def _on_cpu(model, processes: int) -> bool:
    """Whether training runs on the CPU: no GPU here, `accelerate launch` was told `use_cpu`, or one
    process with the model placed on the CPU (`model.device: cpu`). Launched processes load the model on
    the CPU and leave its placement to the Trainer."""
    from accelerate.utils import parse_flag_from_env

    if not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"):  # read as accelerate reads it
        return True
    return processes == 1 and model.device.type == "cpu"


def _save(trainer, model, tokenizer, adapter: Path, task: TaskConfig, token_init: str, seed_init: int, rank: int,
          untrained: list[str]):
    """The adapter, the tokenizer and how to re-create the new tokens' base rows (TOKENS_FILE)."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(adapter))  # every process: gathers the sharded weights, the main one writes
    elif rank == 0:
        # the new rows are in the adapter (trainable tokens) and the rest of the embedding is the base's,
        # re-created on load by the same deterministic init: no need to save the whole resized matrix
        model.save_pretrained(adapter, save_embedding_layers=False)
    if rank == 0:
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["target_modules"] = sorted(config["target_modules"]) if isinstance(config["target_modules"], list) \
            else config["target_modules"]  # peft writes a set in hash order: the same adapter, other bytes
        write_json(adapter / "adapter_config.json", config)
        tokenizer.save_pretrained(adapter)
        write_json(adapter / TOKENS_FILE, {"tokens": task.new_tokens + list(untrained), "init": token_init,
                                           "description": task.description, "seed": seed_init}
                   | ({"untrained": list(untrained)} if untrained else {}))
    trainer.accelerator.wait_for_everyone()


def train_lora(
    model,
    tokenizer,
    rows: list[dict],
    cfg: TrainConfig,
    task: TaskConfig,
    out_dir: Path,
    seed: int,
    max_steps: int = 0,
    neftune_alpha: float = 0.0,
    resume_adapter: Path | None = None,
    run_key: str = "",
    callbacks: list | None = None,
    distill: str = "",
    beta: float = 0.0,
    untrained_tokens: list[str] = (),
    gist: bool = False,
    token_only: bool = False,
    tokens_from: Path | None = None,
) -> dict:
    """Train a LoRA adapter on `rows` (one epoch by default, or exactly `max_steps` optimizer steps)
    and save it with the tokenizer in `out_dir/adapter`; `distill` (anchor or token) adds a KL term to
    the untouched model of weight `beta` (delia.train.distill); `untrained_tokens` (decoys) are added after
    the new tokens, the same way, and their rows are not trained (with `train.new_token_mode`
    trainable_tokens); `gist` trains rows that hold the token with a gist mask (delia.model.gist);
    `token_only` trains the new tokens' rows alone (no LoRA); `tokens_from` (a `token_only` first stage's
    adapter) starts the new tokens' rows where it left them and keeps them frozen. Returns the run's figures."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)  # the LoRA init draws from the global generator: same seed, same adapter, in any process
    model, tokenizer, new_ids, token_init, seed_init = _add_or_resume_tokens(model, tokenizer, cfg, task, seed,
                                                                             resume_adapter, untrained_tokens)
    if tokens_from:
        _first_stage_rows(model, Path(tokens_from), new_ids)
    examples = _examples(tokenizer, rows, cfg.max_length, distill, task, gist)
    rank, processes = world()
    if (left_out := len(rows) - len(examples)) and rank == 0:
        print(f"delia: train: {left_out} of {len(rows)} rows keep no answer token within train.max_length "
              f"{cfg.max_length} (a longer prompt) and are left out", flush=True)
    batch, micro, accumulation = plan_batches(cfg, len(examples), processes)
    embed_name = embedding_module_name(model)
    if not resume_adapter:
        model = get_peft_model(model, lora_config(cfg, embed_name, new_ids, token_only))
    if tokens_from:  # saved in the adapter (peft stores the rows themselves), not trained
        for name, p in model.named_parameters():
            if "trainable_tokens" in name:
                p.requires_grad_(False)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_log = out_dir / "loss.jsonl"
    collator = _CountingCollator(tokenizer, accumulation, model.dtype)
    checkpoint = _resume_or_start(out_dir, run_key, collator, loss_log, rank)
    trainer = (distill_trainer_class() if distill else answer_trainer_class())(
        **({"beta": beta} if distill else {}),
        model=model,
        args=_training_arguments(cfg, out_dir, micro, accumulation, processes, seed, max_steps, neftune_alpha,
                                 bf16=model.dtype == torch.bfloat16, on_cpu=_on_cpu(model, processes)),
        train_dataset=Dataset.from_list(examples),
        data_collator=collator,
        callbacks=[_log_callback(loss_log, collator, rank), *_trackers(cfg, out_dir), *(callbacks or [])],
        optimizer_cls_and_kwargs=_separate_token_lr(model, cfg, embed_name),
    )
    started = time.time()
    if os.environ.get("DELIA_QUIET"):  # `--quiet`: no per-step log lines (the loss log is still written)
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.time() - started
    counts = collator.counts(trainer.state.global_step)
    counts["tokens"], counts["loss_tokens"], counts["padded_tokens"] = _sum_over_processes(
        [counts["tokens"], counts["loss_tokens"], counts["padded_tokens"]])
    _save(trainer, model, tokenizer, out_dir / "adapter", task, token_init, seed_init, rank, untrained_tokens)
    losses = [json.loads(line)["loss"] for line in open(loss_log)] if loss_log.exists() else []
    if rank == 0:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return {
        "rows": len(examples),
        "rows_left_out": left_out,
        "task_rows": sum(r.get("source", "task") == "task" for r in rows),
        "batch_size": batch,
        "micro_batch_size": micro,
        "processes": processes,
        "parallel": ("fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled
                     else "ddp" if processes > 1 else "none"),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "trained_tokens": counts["tokens"],
        "loss_tokens": counts["loss_tokens"],
        "padded_tokens": counts["padded_tokens"],
        # over every step, those before a resume too (the Trainer's own figure counts only its own steps)
        "train_loss": round(sum(losses) / len(losses), 4) if losses else round(result.training_loss, 4),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
        "new_token_ids": new_ids,
        "resumed_from_step": collator.start["step"],
    } | ({"gist_rows": sum(bool(e[GIST]) for e in examples)} if gist else {})
