"""Per-rank memory of a frozen teacher: sharded with FSDP2 over 2 CPU processes vs unwrapped (CPU, gloo).

A randomly initialised GPT-2 of the given shape (default: GPT-2 medium, 355M parameters, 1.4 GB in
float32) is saved once; then, in the same run,

* baseline: one process loads it unwrapped (``kdbench.models.load_model(trainable=False)``);
* FSDP: ``torchrun --nproc_per_node 2`` processes each load it straight into their shards
  (``kdbench.parallel.sharding.load_sharded``), then run one forward (all ranks together); and, for
  comparison, each loads it whole (``load_model``) and then shards it (``shard_frozen``).

Each process reports the bytes of the parameters it holds (local shards) and the increase of its
resident set size (VmRSS) from before loading to after loading (and sharding) and one forward
(a safetensors checkpoint is memory-mapped, so its pages count once the weights are read) — the
memory the teacher keeps for the whole run — plus its peak RSS (VmHWM) increase, which includes the moment the
full checkpoint is read before it is sharded. The script prints ratios FSDP / unwrapped.

Every process runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (``--malloc-mmap-threshold``, 1 MiB;
0 keeps glibc's default): by default glibc raises its mmap threshold each time a large block is freed,
so the per-block all-gather buffers FSDP frees after each forward stay in the heap and the RSS of a
sharded rank grows by hundreds of MB after its first forward (measured: 1.03x instead of 0.55x).
The setting applies to the unwrapped baseline alike.

Usage: ``python benchmarks/fsdp_teacher_memory.py [--layers 24 --hidden 1024] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(model_dir: str, mode: str) -> dict:
    """Load the teacher in this process (``unwrapped``; ``load_sharded``: straight into shards;
    ``load_then_shard``: whole, then ``shard_frozen``); memory figures in MB."""
    import torch

    from kdbench.models import load_model

    sharded = mode != "unwrapped"
    if sharded:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    gc.collect()
    rss_before, hwm_before = _status_kib("VmRSS"), _status_kib("VmHWM")
    if mode == "load_sharded":
        from kdbench.parallel.sharding import load_sharded

        model = load_sharded(model_dir)
    else:
        model = load_model(model_dir, trainable=False)
    if mode == "load_then_shard":
        from kdbench.parallel.sharding import shard_frozen

        shard_frozen(model)
    with torch.no_grad():  # the teacher in use: every weight read once (all ranks forward together)
        logits = model(input_ids=torch.arange(16)[None]).logits
    gc.collect()
    rss_after, hwm_after = _status_kib("VmRSS"), _status_kib("VmHWM")
    from kdbench.parallel.sharding import sharding_report

    report = sharding_report(model)
    result = {"local_parameter_mb": report.local_bytes / 2**20, "full_parameter_mb": report.full_bytes / 2**20,
              "rss_increase_mb": (rss_after - rss_before) / 1024, "peak_rss_increase_mb": (hwm_after - max(hwm_before, rss_before)) / 1024,
              "dtensor_parameters": report.sharded_parameters, "parameters": report.parameters,
              "logits_finite": bool(torch.isfinite(logits).all())}
    if sharded:
        import torch.distributed as dist

        result["rank"] = dist.get_rank()
        dist.destroy_process_group()
    result["mode"] = mode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--out", default=None, help="Folder for the model and the JSON result (default: a temp dir).")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for every process (0: glibc's dynamic default).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: measure and write JSON here
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="unwrapped", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        result = measure(options.model_dir, options.mode)
        name = f"{options.mode}-rank{result['rank']}.json" if "rank" in result else "unwrapped.json"
        Path(options.worker, name).write_text(json.dumps(result))
        return

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(options.out or tempfile.mkdtemp(prefix="kdbench-fsdp-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "teacher"
    config = GPT2Config(n_layer=options.layers, n_embd=options.hidden, n_head=max(1, options.hidden // 64),
                        vocab_size=options.vocab, n_positions=1024)
    if not (model_dir / "config.json").is_file() or json.loads((model_dir / "config.json").read_text())["n_layer"] != options.layers:
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if options.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(options.malloc_mmap_threshold)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    here = str(Path(__file__).resolve())
    common = [here, "--worker", str(out), "--model-dir", str(model_dir)]
    subprocess.run([sys.executable, *common], check=True, env=env)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    for mode in ("load_sharded", "load_then_shard"):
        subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29541", *common, "--mode", mode],
                       check=True, env=env)
    base = json.loads((out / "unwrapped.json").read_text())
    ranks = [json.loads((out / f"load_sharded-rank{r}.json").read_text()) for r in range(2)]
    whole_first = [json.loads((out / f"load_then_shard-rank{r}.json").read_text()) for r in range(2)]
    print(f"MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}")
    print(f"teacher: GPT-2 shape {options.layers} layers x {options.hidden}, "
          f"{base['full_parameter_mb']:.0f} MB float32 parameters ({base['parameters']} tensors)")
    print("| process | local parameter MB | RSS increase MB | peak RSS increase MB | parameters ratio | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| 1 process, unwrapped | {base['local_parameter_mb']:.0f} | {base['rss_increase_mb']:.0f} | "
          f"{base['peak_rss_increase_mb']:.0f} | 1.00 | 1.00 |")
    for seen in ranks + whole_first:
        how = "load_sharded" if seen["mode"] == "load_sharded" else "load_model + shard_frozen"
        print(f"| FSDP rank {seen['rank']} of 2, {how} | {seen['local_parameter_mb']:.0f} | {seen['rss_increase_mb']:.0f} | "
              f"{seen['peak_rss_increase_mb']:.0f} | {seen['local_parameter_mb'] / base['local_parameter_mb']:.2f} | "
              f"{seen['rss_increase_mb'] / base['rss_increase_mb']:.2f} |")
    summary = {"malloc_mmap_threshold": options.malloc_mmap_threshold, "unwrapped": base, "ranks": ranks, "load_then_shard": whole_first, "layers": options.layers, "hidden": options.hidden,
               "parameter_ratio_max": max(s["local_parameter_mb"] for s in ranks) / base["local_parameter_mb"],
               "rss_ratio_max": max(s["rss_increase_mb"] for s in ranks) / base["rss_increase_mb"]}
    (out / "fsdp_teacher_memory.json").write_text(json.dumps(summary, indent=2))
    print(f"worst rank: parameters {summary['parameter_ratio_max']:.2f}x, RSS increase {summary['rss_ratio_max']:.2f}x "
          f"the unwrapped teacher (target <= 0.6x); {out / 'fsdp_teacher_memory.json'}")


if __name__ == "__main__":
    main()
