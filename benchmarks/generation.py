"""Batched greedy generation (kdbench HFBackend) vs one prompt at a time (transformers generate()).

    python benchmarks/generation.py [--prompts 64] [--max-new-tokens 64] [--batch-size 32] [--repeats 3]

A random-init GPT-2 (4 layers x 256, 4 heads, the real GPT-2 tokenizer and vocabulary) greedily
continues the first N real Dolly prompts (MiniLLM's Alpaca template, <= 256 prompt tokens).

* float32: the batched outputs must equal the one-at-a-time outputs token for token.
* bfloat16: left padding and batch shape change the rounding, so outputs may differ. For every
  prompt whose outputs differ, the first differing step is re-run unbatched and the gap between the
  top-2 logits there is reported, in bf16 units in the last place (ulp) of the top logit, next to
  the median top-2 gap over all steps of all prompts.
* speed: generated tokens per second, median of the repeats, and the batched / one-at-a-time ratio.

Needs /work/shared (the GPT-2 tokenizer and the Dolly file); set KDBENCH_SHARED to move it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("KDBENCH_SHARED", REPO.parent / "shared"))


def build(dtype):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / "gpt2-tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=len(tokenizer), n_positions=1024)
    model = GPT2LMHeadModel(config).eval().to(dtype)
    return model, tokenizer


def dolly_prompts(n: int) -> list[str]:
    from kdbench.suites import load_examples_file

    examples = load_examples_file(SHARED / "data" / "dolly" / "minillm_processed" / "valid.jsonl", limit=n)
    return [e.prompt for e in examples]


def one_at_a_time(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers generate(), greedy, one unpadded prompt per call; new tokens up to (not incl.) EOS."""
    import torch

    outputs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            tensor = torch.tensor([ids])
            out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = out[0, len(ids):].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            outputs.append(new)
    return outputs


def batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """kdbench HFBackend greedy; the new token ids of each prompt (EOS excluded)."""
    from kdbench.generate import DecodingConfig, HFBackend

    backend = HFBackend(model, tokenizer)
    decoding = DecodingConfig(greedy=True, max_new_tokens=max_new_tokens, batch_size=batch_size)
    encoded = backend.encode(prompts, decoding.max_prompt_length)
    tokens: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for index, (new, _) in zip(chunk, backend.generate_ids([encoded[i][0] for i in chunk],
                                                               [str(i) for i in chunk], decoding, None)):
            tokens[index] = new
    return tokens


def _ulp(value: float) -> float:
    """bf16 unit in the last place at ``value`` (8 significant bits)."""
    top = abs(value)
    return 2.0 ** (math.floor(math.log2(top)) - 7) if top > 0 else 2.0 ** -133


def divergence_gaps(model, ids: list[int], chosen: list[int]) -> dict:
    """At the first differing step (after ``ids``), re-run unbatched: the top-2 logit gap and the gap
    between the two tokens the two runs chose, in bf16 ulps of the top logit, and their ranks."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    values, indices = logits.topk(2)
    ulp = _ulp(float(values[0]))
    order = logits.argsort(descending=True).tolist()
    result = {"top2_gap_ulps": float(values[0] - values[1]) / ulp,
              "chosen_are_top2": sorted(indices.tolist()) == sorted(chosen),
              "chosen_ranks": [order.index(t) + 1 for t in chosen]}
    if len(chosen) == 2:
        result["chosen_gap_ulps"] = abs(float(logits[chosen[0]] - logits[chosen[1]])) / ulp
    return result


def all_step_gaps(model, prompt_ids: list[list[int]], outputs: list[list[int]], limit: int = 16) -> list[float]:
    """Top-2 gaps (in ulps) at every step of the first ``limit`` prompts (one forward per prompt)."""
    import torch

    gaps = []
    with torch.inference_mode():
        for ids, new in list(zip(prompt_ids, outputs))[:limit]:
            logits = model(torch.tensor([ids + new])).logits[0, len(ids) - 1:len(ids) - 1 + len(new)].float()
            values = logits.topk(2).values
            for v in values:
                top = abs(float(v[0]))
                gaps.append(float(v[0] - v[1]) / _ulp(top))
    return gaps


def run(dtype_name: str, args) -> dict:
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model, tokenizer = build(dtype)
    prompts = dolly_prompts(args.prompts)
    from kdbench.generate import HFBackend

    prompt_ids = [ids for ids, _ in HFBackend(model, tokenizer).encode(prompts, 256)]
    times = {"batched": [], "one_at_a_time": []}
    outs = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs["batched"] = batched(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        times["batched"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs["one_at_a_time"] = one_at_a_time(model, tokenizer, prompt_ids, args.max_new_tokens)
        times["one_at_a_time"].append(time.perf_counter() - t0)
    n_tokens = {k: sum(len(t) for t in v) for k, v in outs.items()}
    result = {"dtype": dtype_name, "prompts": len(prompts), "prompt_tokens_mean": statistics.mean(map(len, prompt_ids)),
              "times": times, "tokens": n_tokens}
    for kind in times:
        result[f"{kind}_median_s"] = statistics.median(times[kind])
        result[f"{kind}_tokens_per_s"] = n_tokens[kind] / statistics.median(times[kind])
    result["speedup"] = result["batched_tokens_per_s"] / result["one_at_a_time_tokens_per_s"]
    same = [a == b for a, b in zip(outs["batched"], outs["one_at_a_time"])]
    result["identical"] = sum(same)
    divergences = []
    for i, equal in enumerate(same):
        if equal:
            continue
        a, b = outs["batched"][i], outs["one_at_a_time"][i]
        k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        chosen = [x[k] for x in (a, b) if k < len(x)]
        divergences.append({"prompt": i, "step": k, **divergence_gaps(model, prompt_ids[i] + b[:k], chosen)})
    result["divergences"] = divergences
    if divergences:
        result["median_gap_ulps_all_steps"] = statistics.median(all_step_gaps(model, prompt_ids, outs["one_at_a_time"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.prompts} Dolly prompts, "
          f"greedy, <= {args.max_new_tokens} new tokens, batch size {args.batch_size}, {args.repeats} repeats")
    for dtype in args.dtypes.split(","):
        r = run(dtype, args)
        print(f"\n[{dtype}] mean prompt length {r['prompt_tokens_mean']:.0f} tokens")
        for kind in ("one_at_a_time", "batched"):
            print(f"  {kind:<14} median {r[f'{kind}_median_s']:7.2f} s  {r[f'{kind}_tokens_per_s']:8.1f} tokens/s  "
                  f"({r['tokens'][kind]} tokens; runs {', '.join(f'{t:.2f}' for t in r['times'][kind])} s)")
        print(f"  speed-up (tokens/s) {r['speedup']:.2f}x")
        print(f"  identical outputs: {r['identical']} / {r['prompts']}")
        if r["divergences"]:
            print(f"  median top-2 gap over all steps (16 prompts): {r['median_gap_ulps_all_steps']:.1f} ulp")
            for d in r["divergences"]:
                print(f"  prompt {d['prompt']:>2}: first differs at step {d['step']:>2}; top-2 gap "
                      f"{d['top2_gap_ulps']:.2f} ulp; the two chosen tokens: ranks {d['chosen_ranks']}, "
                      f"{d.get('chosen_gap_ulps', float('nan')):.2f} ulp apart")
        print(json.dumps({k: v for k, v in r.items() if k not in ("divergences",)}, default=str))


if __name__ == "__main__":
    main()
