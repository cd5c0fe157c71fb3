"""Measure the per-token compute costs ``kdbench reproduce --dry-run`` converts its plans with.

On this machine's CPU, a randomly initialised GPT-2 base (124M parameters, the DPKD / AKL student) is timed on
(1) a training step (forward + backward + AdamW) and (2) sampled generation with the KV cache; each figure is
the median of several repeats, turned into achieved FLOP/s with the usual counts (training 6 N per token,
generation 2 N per token; N = non-embedding + embedding parameters). The dry-run divides each stage's FLOPs by
these to give CPU-hours, and by a stated GPU throughput (kdbench.reproduce.costs.DEVICE) to give GPU-hours.

    python benchmarks/reproduce_costs.py            # prints the figures and the JSON to commit
    python benchmarks/reproduce_costs.py --write    # also writes kdbench/reproduce/measured_costs.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    n_params = sum(p.numel() for p in model.parameters())
    batch, length, repeats = 2, 64, 3
    ids = torch.randint(0, 50257, (batch, length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    train_seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:  # the first step warms up allocators
            train_seconds.append(time.perf_counter() - start)
    train_tokens_per_s = batch * length / statistics.median(train_seconds)
    model.eval()
    new_tokens, gen_seconds = 16, []
    prompt = ids[:, :32]
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=0)
            if i:
                gen_seconds.append(time.perf_counter() - start)
    gen_tokens_per_s = batch * new_tokens / statistics.median(gen_seconds)
    figures = {
        "device": "CPU (2 cores shared with other jobs), torch " + torch.__version__ + f", {torch.get_num_threads()} threads",
        "model": "GPT-2 base (random init)", "params": n_params,
        "train_tokens_per_second": round(train_tokens_per_s, 2),
        "generate_tokens_per_second": round(gen_tokens_per_s, 2),
        "train_flops_per_second": round(6 * n_params * train_tokens_per_s),
        "generate_flops_per_second": round(2 * n_params * gen_tokens_per_s),
        "batch": batch, "sequence_tokens": length, "generated_tokens": new_tokens, "repeats": repeats,
    }
    print(json.dumps(figures, indent=2))
    if "--write" in sys.argv:
        out = Path(__file__).resolve().parent.parent / "kdbench" / "reproduce" / "measured_costs.json"
        out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
