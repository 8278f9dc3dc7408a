"""Generated tokens per second of the `sample` stage's backends on the same requests, in one run:
transformers' own batched sampling (`generate` with its temperature and top-p warpers, prompts length-sorted
and left-padded), delia's local backend (the same `generate`, its sampling done by `delia.model.generate.draw`)
at batch 16, 32 and 48, and the ctranslate2
backend in float32 and int8 at their best batch and worker count, each with its share of this machine's measured peak
(fp32 matmul; 2 x parameters FLOPs a generated token, attention left out), and the mean per-token
KL(float32 || int8) of CTranslate2 on the float32 answers (teacher-forced, every answer token), beside
KL(local || CTranslate2 float32) as the floor of numerical noise.

    .venv/bin/python benchmarks/sample_throughput.py [--n 48] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import matmul_peak  # noqa: E402

from delia.data.queries import load_queries  # noqa: E402
from delia.data.sample import build_prompt  # noqa: E402
from delia.model.ct2 import CT2Generator  # noqa: E402
from delia.model.generate import LocalGenerator, Request, request_ids  # noqa: E402
from delia.model.loading import load_model, resolve_model  # noqa: E402


def timed(generator, requests, max_new_tokens) -> tuple[float, list]:
    t = time.perf_counter()
    out = [row for batch in generator.batches(requests, max_new_tokens, 0.7, 0.95, seed=0) for row in batch]
    return time.perf_counter() - t, out


def hf_sampling(model, tokenizer, requests, batch_size: int, max_new_tokens: int) -> tuple[float, list]:
    """transformers' `generate` sampling as it comes (temperature and top-p warpers, `torch.multinomial`)."""
    from delia.model.generate import length_sorted_chunks, request_ids

    t, out = time.perf_counter(), []
    eos = model.generation_config.eos_token_id
    for chunk in length_sorted_chunks([(request_ids(tokenizer, r), r) for r in requests], batch_size):
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i, _ in chunk])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in chunk])
        torch.manual_seed(0)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=0.7, top_p=0.95, top_k=None, pad_token_id=tokenizer.pad_token_id)
        for row, (_, r) in zip(gen[:, width:].tolist(), chunk):
            n = next((j for j, tok in enumerate(row) if tok in (eos if isinstance(eos, list) else [eos])), len(row))
            out.append((r, "", n))
    return time.perf_counter() - t, out


def ct2_logprobs(gen: CT2Generator, sequences: list[list[int]]) -> list[np.ndarray]:
    """Log-probabilities over the vocabulary at every position of each sequence (CTranslate2's forward pass)."""
    out = []
    for ids in sequences:
        logits = np.array(gen.generator.forward_batch([gen.tokenizer.convert_ids_to_tokens(ids)]))[0]
        out.append(torch.log_softmax(torch.from_numpy(logits).float(), -1).numpy())
    return out


def mean_kl(p_logs: list[np.ndarray], q_logs: list[np.ndarray], starts: list[int]) -> float:
    """Mean over answer tokens of KL(p || q); row i's answer is predicted from position starts[i] - 1 on."""
    total, n = 0.0, 0
    for p, q, s in zip(p_logs, q_logs, starts):
        p, q = p[s - 1 : -1], q[s - 1 : -1]
        total += float((np.exp(p) * (p - q)).sum())
        n += len(p)
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--local-batches", default="16,32,48")
    ap.add_argument("--ct2-batches", default="16,48")
    args = ap.parse_args()
    conversations, _ = load_queries("alpaca_en_demo")
    requests = [Request(key=str(i), messages=build_prompt(c, "plain", "")[1]) for i, c in enumerate(conversations[: args.n])]
    (peak, _), torch_threads = matmul_peak(), torch.get_num_threads()
    model, tokenizer = load_model(args.model)
    params = sum(p.numel() for p in model.parameters() if p.dim() > 1) - model.get_input_embeddings().weight.numel() * (
        0 if model.config.tie_word_embeddings else 1)  # matmul weights; a tied embedding counts once (the output layer)
    results = []

    def record(name, seconds, rows):
        tokens = sum(n for _, _, n in rows)
        results.append((name, tokens, seconds))
        print(f"{name:38s} {tokens:6d} tokens {seconds:7.1f} s {tokens / seconds:7.1f} tok/s "
              f"{100 * 2 * params * tokens / seconds / 1e9 / peak:5.1f} % of peak", flush=True)
        return rows

    for b in map(int, args.local_batches.split(",")):
        record(f"transformers generate, batch {b}", *hf_sampling(model, tokenizer, requests, b, args.max_new_tokens))
    for b in map(int, args.local_batches.split(",")):
        record(f"local, batch {b}", *timed(LocalGenerator(model, tokenizer, b), requests, args.max_new_tokens))
    folder = resolve_model(args.model)
    answers = {}
    for compute in ("float32", "int8"):
        for b in map(int, args.ct2_batches.split(",")):
            for workers in (1, 0):  # one worker on every core; the default (two one-thread workers here)
                gen = CT2Generator(folder, b, compute, "cpu", workers=workers)
                timed(gen, requests[:b], 8)  # warm-up (first allocation)
                answers[compute] = record(f"ctranslate2 {compute}, batch {b}, {gen.workers} worker(s)",
                                          *timed(gen, requests, args.max_new_tokens))
    best_hf = max(t / s for name, t, s in results if name.startswith("transformers"))
    best_local = max(t / s for name, t, s in results if name.startswith("local"))
    print(f"local best / transformers generate best: {best_local / best_hf:.2f}x")
    for compute in ("float32", "int8"):
        best = max(t / s for name, t, s in results if name.startswith(f"ctranslate2 {compute}"))
        print(f"ctranslate2 {compute} best / local best: {best / best_local:.2f}x, / transformers generate best: "
              f"{best / best_hf:.2f}x")

    # KL on the float32 answers: CTranslate2 int8 against float32, and CTranslate2 float32 against local
    rows = answers["float32"][:16]
    f32, i8 = CT2Generator(folder, 16, "float32", "cpu"), CT2Generator(folder, 16, "int8", "cpu")
    prompts = [request_ids(tokenizer, r) for r, _, _ in rows]
    seqs = [p + tokenizer(text, add_special_tokens=False)["input_ids"] for p, (_, text, _) in zip(prompts, rows)]
    starts = [len(p) for p in prompts]
    lp32, lp8 = ct2_logprobs(f32, seqs), ct2_logprobs(i8, seqs)
    with torch.inference_mode():
        local = [torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1).numpy() for s in seqs]
    print(f"KL(ctranslate2 float32 || int8) per answer token: {mean_kl(lp32, lp8, starts):.4f} nats "
          f"({sum(len(s) - st for s, st in zip(seqs, starts))} tokens, {len(rows)} answers)")
    print(f"KL(local float32 || ctranslate2 float32) per answer token: {mean_kl(local, lp32, starts):.6f} nats")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch_threads} "
          f"torch threads, fp32 matmul peak {peak:.1f} GFLOP/s; torch {torch.__version__}; {params / 1e6:.0f}M matmul params")
    print(f"command: {' '.join([sys.executable.split('/')[-1]] + sys.argv)}")


if __name__ == "__main__":
    main()
