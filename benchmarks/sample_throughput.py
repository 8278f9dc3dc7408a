"""Generated tokens per second of delia's local backend (the `sample` stage's generator) against a
plain batched `model.generate` loop and a per-request loop over the same requests (same batch size
for the batched ones, same sampling settings), in one run on the same model.

    .venv/bin/python benchmarks/sample_throughput.py [--n 64] [--batch-size 16] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from delia.data.queries import load_queries
from delia.data.sample import build_prompt
from delia.model.generate import LocalGenerator, Request
from delia.model.loading import load_model


def plain_loop(model, tokenizer, prompts, batch_size, max_new_tokens, seed):
    """The loop a user writes: batches in dataset order, the tokenizer's left padding, generate."""
    tokenizer.padding_side = "left"
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + start)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.95,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        tokens += int(((new != tokenizer.pad_token_id) & (new != tokenizer.eos_token_id)).sum())
    return tokens


def per_request_loop(model, tokenizer, prompts, max_new_tokens, seed):
    """One `generate` call per request: what a user writes without batching."""
    tokens = 0
    for i, p in enumerate(prompts):
        ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        torch.manual_seed(seed + i)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.95,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        tokens += int((new != tokenizer.eos_token_id).sum())
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    conversations, _ = load_queries("alpaca_en_demo")
    prompts = [build_prompt(c, "plain", "")[1] for c in conversations[: args.n]]

    t = time.perf_counter()
    gen = LocalGenerator(model, tokenizer, args.batch_size)
    requests = [Request(key=str(i), messages=p) for i, p in enumerate(prompts)]
    delia_tokens = sum(n for batch in gen.batches(requests, args.max_new_tokens, 0.7, 0.95, seed=0) for _, _, n in batch)
    delia_s = time.perf_counter() - t

    t = time.perf_counter()
    plain_tokens = plain_loop(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, seed=0)
    plain_s = time.perf_counter() - t

    t = time.perf_counter()
    single_tokens = per_request_loop(model, tokenizer, prompts, args.max_new_tokens, seed=0)
    single_s = time.perf_counter() - t

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"command: {' '.join([sys.executable.split('/')[-1]] + sys.argv)}")
    print(f"delia sample backend : {delia_tokens} tokens in {delia_s:.1f} s = {delia_tokens / delia_s:.1f} tok/s")
    print(f"plain batched loop   : {plain_tokens} tokens in {plain_s:.1f} s = {plain_tokens / plain_s:.1f} tok/s")
    print(f"per-request loop     : {single_tokens} tokens in {single_s:.1f} s = {single_tokens / single_s:.1f} tok/s")
    print(f"ratio (delia / plain): {(delia_tokens / delia_s) / (plain_tokens / plain_s):.2f}x")
    print(f"ratio (delia / per-request): {(delia_tokens / delia_s) / (single_tokens / single_s):.2f}x")


if __name__ == "__main__":
    main()
