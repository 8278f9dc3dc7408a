"""Training tokens per second and peak memory of delia's `train` against TRL's `SFTTrainer` on the same
model, rows, LoRA settings, batch and schedule (loss on the answers only, one epoch), each in its own
process; also delia with the Trainer's random micro-batches (`train.sampling: random`), to show where
the difference comes from. Prints the loss of every step of each, and model FLOPs utilisation
against the measured matmul peak of the device both train on (the GPU in bf16 when there is one, as
`model.device: auto` places the model; else the CPU in fp32).

    pip install trl==1.16.0   # the peer, not a delia dependency
    .venv/bin/python benchmarks/train_throughput.py [--task-rows 24] [--ratio 3] [--batch 16] [--micro 4]

Rows: the demo task's rows (or `--task-source`'s, e.g. the paper's task with its long prompts) and Alpaca
demo queries with their reference answers, mixed as `mix` does. delia's options: `anchor` trains the
Alpaca rows by KL to the untouched model (the `kl_anchor` arm), `full-logits` makes the output layer's
logits at every position as before `delia.train.loss` (the Trainer's own loss; for `anchor`, the whole
logits of both models), to measure what computing them at the answer tokens alone saves:

    .venv/bin/python benchmarks/train_throughput.py --arms delia delia:full-logits delia:anchor delia:anchor:full-logits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def rows(task_rows: int, ratio: float, seed: int = 0, source: str = "") -> list[dict]:
    from delia.config import ALPACA_DEMO, TaskConfig
    from delia.data.mix import mix_with_diverse
    from delia.data.queries import load_queries
    from delia.data.task import build_task

    task, _ = build_task(TaskConfig(train_rows=task_rows, eval_rows=1, **({"source": source} if source else {})), seed)
    queries, _ = load_queries(ALPACA_DEMO)
    diverse = [{"messages": q[:2]} for q in queries if len(q) >= 2 and q[1]["role"] == "assistant"]
    return mix_with_diverse(task, diverse, ratio, seed)


def matmul_peak(seconds: float = 3.0) -> tuple[float, str]:
    """(GFLOP/s of torch.mm, what was measured): bf16 on the GPU when there is one, else fp32 on the CPU
    at torch's thread count."""
    import torch

    cuda = torch.cuda.is_available()
    n, kw = (8192, {"device": "cuda", "dtype": torch.bfloat16}) if cuda else (2048, {})
    a, b = torch.randn(n, n, **kw), torch.randn(n, n, **kw)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
        if cuda:
            torch.cuda.synchronize()
    what = f"bf16 on {torch.cuda.get_device_name()}" if cuda else f"fp32 on the CPU, {torch.get_num_threads()} threads"
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9, what


def run_delia(data: list[dict], args, sampling: str, checkpointing: bool, out: Path, options=()) -> dict:
    from delia.config import TaskConfig, TrainConfig
    from delia.model.loading import load_model
    from delia.train import loss, sft

    if "full-logits" in options:  # as before delia.train.loss: every position's logits
        from transformers import Trainer

        sft.answer_trainer_class = lambda: Trainer
        loss.keeps_logits = lambda model: False
    model, tokenizer = load_model(MODEL)
    cfg = TrainConfig(batch_size=args.batch, micro_batch_size=args.micro, sampling=sampling, save_steps=0,
                      gradient_checkpointing=checkpointing, max_length=args.max_length)
    stats = sft.train_lora(model, tokenizer, data, cfg, TaskConfig(), out, seed=0,
                           **({"distill": "anchor", "beta": 1.0} if "anchor" in options else {}))
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    return {"seconds": stats["seconds"], "tokens": stats["trained_tokens"], "padded_tokens": stats["padded_tokens"],
            "steps": stats["steps"], "losses": losses, "params": sum(p.numel() for p in model.parameters())}


def run_trl(data: list[dict], args, checkpointing: bool, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from delia.config import TrainConfig
    from delia.model.loading import load_model

    model, tokenizer = load_model(MODEL)
    c = TrainConfig()
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in data])
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.micro,
                       gradient_accumulation_steps=args.batch // args.micro, learning_rate=c.learning_rate,
                       num_train_epochs=1, lr_scheduler_type=c.lr_scheduler, warmup_steps=c.warmup_ratio,
                       logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=c.max_length,
                       completion_only_loss=True, packing=False, disable_tqdm=True,
                       bf16=model.dtype == torch.bfloat16, use_cpu=model.device.type == "cpu",  # where delia trains
                       gradient_checkpointing=checkpointing)
    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=c.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
    return {"seconds": result.metrics["train_runtime"], "tokens": tokens, "padded_tokens": None,
            "steps": trainer.state.global_step, "losses": losses,
            "params": sum(p.numel() for p in model.parameters())}


def child(name: str, args) -> None:
    data = rows(args.task_rows, args.ratio, source=args.task_source)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        tool, *options = name.split(":")
        checkpointing = "checkpointing" in options
        if tool == "trl":
            result = run_trl(data, args, checkpointing, out)
        else:
            result = run_delia(data, args, "random" if "random" in options else "batch_rebalance", checkpointing, out,
                               options)
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task-rows", type=int, default=24)
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--task-source", default="", help="the task's rows (default: the demo task)")
    p.add_argument("--arms", nargs="+", default=["trl:checkpointing", "delia:checkpointing", "trl", "delia:random", "delia"],
                   help="TOOL[:OPTION...]: trl or delia; checkpointing (gradient checkpointing, TRL's default), "
                        "random (delia with the Trainer's random micro-batches), anchor, full-logits (see above)")
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.child:
        return child(args.child, args)
    import torch

    peak, measured = matmul_peak()
    print(f"matmul peak: {peak:,.1f} GFLOP/s ({measured})", flush=True)
    results = {}
    for name in args.arms:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", name], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = results[name] = json.loads(line[len("RESULT "):])
        mfu = 4 * r["params"] * r["tokens"] / r["seconds"] / 1e9 / peak  # LoRA: forward + input gradients
        pad = f", {r['padded_tokens']:,} with padding" if r["padded_tokens"] else ""
        print(f"{name:22s} {r['steps']} steps, {r['tokens']:,} tokens{pad} in {r['seconds']:.1f} s = "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s, MFU {100 * mfu:.1f} %, peak RSS {r['peak_mib']:,.0f} MiB",
              flush=True)
        print(f"{'':22s} loss per step: {' '.join(f'{x:.3f}' for x in r['losses'])}", flush=True)
    for name, r in results.items():  # each delia arm against TRL with the same gradient checkpointing
        peer = "trl" + "".join(f":{o}" for o in name.split(":")[1:] if o == "checkpointing")
        if name.startswith("delia") and peer in results:
            t = results[peer]
            print(f"{name} / {peer}: {r['tokens'] / r['seconds'] / (t['tokens'] / t['seconds']):.2f}x tokens/s, "
                  f"{r['peak_mib'] / t['peak_mib']:.2f}x peak memory, mean loss {sum(r['losses']) / len(r['losses']):.3f}"
                  f" vs {sum(t['losses']) / len(t['losses']):.3f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {MODEL} "
          f"{'bf16 on the GPU' if torch.cuda.is_available() else 'fp32 on the CPU'}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    main()
