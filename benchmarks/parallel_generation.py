"""Data-parallel generation throughput: 2 processes (torchrun, gloo) vs 1 process on the same machine.

The same generation runs as ``kdbench eval`` does it (``kdbench.parallel.split_generation``: prompts
split across ranks, per-rank partial files, one merge) with a randomly initialised GPT-2 of the
given shape on Dolly prompts (the shared GPT-2 tokenizer and data), sampling at temperature 1.
Timed from a barrier after the model is loaded to the merged file; each mode is repeated and the
median taken. The outputs of both modes are checked identical (per-example seeding).

Usage: ``python benchmarks/parallel_generation.py [--prompts 48 --max-new-tokens 48 --repeats 3]``.
Prints the medians and the ratio of throughputs (2 processes / 1 process); with other jobs on the
machine's cores, the ratio measures what was free, not the ideal 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def worker(options) -> None:
    import torch

    from kdbench.data import format_prompt
    from kdbench.generate import DecodingConfig, HFBackend
    from kdbench.models import load_model, load_tokenizer
    from kdbench.parallel.ranks import current_ranks
    from kdbench.parallel.split_generation import generate_split
    from kdbench.store import read_jsonl

    torch.set_num_threads(1)
    ranks = current_ranks()
    tokenizer = load_tokenizer(options.model_dir)
    backend = HFBackend(load_model(options.model_dir, trainable=False), tokenizer)
    rows = read_jsonl(options.data)[:options.prompts]
    prompts = [format_prompt(r["instruction"], r.get("input", ""), style="alpaca") for r in rows]
    ids = [str(i) for i in range(len(prompts))]
    decoding = DecodingConfig(max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)

    def generate(indices, write):
        if indices:
            backend.generate([prompts[i] for i in indices], [ids[i] for i in indices], decoding, seed=10,
                             on_batch=lambda batch: write([{"id": g.id, "output": g.text, "new_tokens": g.new_tokens}
                                                           for g in batch]))

    ranks.barrier()
    start = time.perf_counter()
    done = generate_split(ranks, Path(options.worker) / "generations.jsonl", ids, generate)
    seconds = time.perf_counter() - start
    if ranks.is_main:
        Path(options.worker, "timing.json").write_text(json.dumps({
            "seconds": seconds, "processes": ranks.world_size, "new_tokens": sum(r["new_tokens"] for r in done.values()),
            "outputs": {i: done[i]["output"] for i in ids}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(SHARED / "data" / "dolly" / "minillm_processed" / "valid.jsonl"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = Path(options.out or tempfile.mkdtemp(prefix="kdbench-parallel-generation-"))
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "models" / "gpt2-tokenizer"))
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=options.layers, n_embd=options.hidden, n_head=options.hidden // 64,
                                   vocab_size=len(tokenizer))).save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    common = ["--model-dir", str(model_dir), "--data", options.data, "--prompts", str(options.prompts),
              "--max-new-tokens", str(options.max_new_tokens), "--batch-size", str(options.batch_size)]
    seconds: dict[int, list[float]] = {1: [], 2: []}
    outputs: dict[int, dict] = {}
    tokens = 0
    for repeat in range(options.repeats):
        for processes in (1, 2):  # interleaved, so that load on the machine hits both modes alike
            folder = out / f"run-{processes}-{repeat}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            launcher = [sys.executable] if processes == 1 else [torchrun, "--nproc_per_node", "2",
                                                                 "--master_port", "29553"]
            subprocess.run([*launcher, str(Path(__file__).resolve()), "--worker", str(folder), *common], check=True,
                           env=env, capture_output=True)
            timing = json.loads((folder / "timing.json").read_text())
            seconds[processes].append(timing["seconds"])
            outputs[processes] = timing["outputs"]
            tokens = timing["new_tokens"]
    assert outputs[1] == outputs[2], "2-process generations differ from 1-process ones"
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    print(f"GPT-2 {options.layers}x{options.hidden}, {options.prompts} prompts, {tokens} new tokens, "
          f"batch {options.batch_size}, {options.repeats} repeats (outputs identical)")
    print("| processes | median seconds | tokens/s | throughput ratio |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 | {one:.2f} | {tokens / one:.0f} | 1.00 |")
    print(f"| 2 | {two:.2f} | {tokens / two:.0f} | {one / two:.2f} |")
    (out / "parallel_generation.json").write_text(json.dumps({"seconds": seconds, "new_tokens": tokens,
                                                              "ratio": one / two}, indent=2))


if __name__ == "__main__":
    main()
