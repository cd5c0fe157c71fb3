"""Memory and time of kdbench's distillation losses: naive vs chunked-logits vs fused.

Each (variant, vocabulary) runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.
Forward + backward of forward KL at B=4, T=512 in bf16 (as real training feeds it):

* logits path: inputs are student/teacher logits [B, T, V]. ``naive`` is the usual code
  (log_softmax of float32 copies of the full tensors, autograd); ``chunked`` is ``kdbench.losses.fkl``.
  Reported: extra memory = peak − (RSS with the inputs allocated) − (the input gradient, B·T·V bf16).
* fused path: inputs are hidden states and ``lm_head`` weights. ``naive_step`` materializes both
  models' logits and runs the naive loss; ``fused`` is ``kdbench.losses.fused_token_loss``.
  Reported: whole-step peak = peak − (RSS before any input was allocated).

Timing: every worker runs with one intra-op thread (``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``): on a shared 2-core machine two threads make every operation wait for
the busier core. Each worker does ``--passes`` forward+backward passes, the first a warm-up (not
timed); the variants run interleaved (naive, chunked, naive_step, fused, naive, ...) for ``--repeats``
rounds so that load drifts hit all alike; reported: medians over rounds, and the median and range of
the per-round time ratios.

Targets (relative to naive in the same run): chunked extra ≤ 0.25×, fused whole-step peak ≤ 0.25×,
time ≤ 1.1×. Usage: ``python benchmarks/losses.py [--quick] [--repeats N] [--passes N]``.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_bf16(shape, seed: int, scale: float = 1.0):
    """A bf16 tensor filled in small float32 pieces (no full-size float32 temporary)."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1, shape[-1])
    g = torch.Generator().manual_seed(seed)
    for start in range(0, flat.shape[0], 16):
        flat[start:start + 16] = (torch.randn(flat[start:start + 16].shape, generator=g) * scale).to(torch.bfloat16)
    return out


def _naive_fkl(student_logits, teacher_logits, mask):
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    per_position = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return (per_position * mask).sum() / mask.sum()


def worker(variant: str, batch: int, seq_len: int, vocab: int, hidden: int, passes: int) -> dict:
    """Run one variant (in this fresh process) and return its figures; pass 1 is an untimed warm-up."""
    import torch

    torch.set_num_threads(1)
    from kdbench.losses import fkl, fused_token_loss

    torch.manual_seed(0)
    mask = torch.ones(batch, seq_len)
    mask[:, : seq_len // 8] = 0  # a prompt part that does not count
    base = _rss_mib()
    times = []
    if variant in ("naive", "chunked"):
        student = _random_bf16((batch, seq_len, vocab), 1, 3.0).requires_grad_()
        teacher = _random_bf16((batch, seq_len, vocab), 2, 3.0)
        with_inputs = _rss_mib()
        loss_fn = _naive_fkl if variant == "naive" else fkl
        for _ in range(passes):
            start = time.perf_counter()
            loss = loss_fn(student, teacher, mask)
            loss.backward()
            times.append(time.perf_counter() - start)
            value = float(loss.detach())
            student.grad = None
            del loss
        grad_mib = student.numel() * 2 / 2**20
        peak = _peak_mib()
        return {"variant": variant, "vocab": vocab, "loss": value, "times_s": times,
                "threads": torch.get_num_threads(),
                "peak_mib": peak, "extra_mib": peak - with_inputs - grad_mib, "step_mib": peak - base}
    student_hidden = _random_bf16((batch, seq_len, hidden), 3).requires_grad_()
    teacher_hidden = _random_bf16((batch, seq_len, hidden), 4)
    student_weight = _random_bf16((vocab, hidden), 5, 0.05).requires_grad_()
    teacher_weight = _random_bf16((vocab, hidden), 6, 0.05)
    with_inputs = _rss_mib()
    for _ in range(passes):
        start = time.perf_counter()
        if variant == "naive_step":
            student_logits = student_hidden @ student_weight.t()
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.t()
            loss = _naive_fkl(student_logits, teacher_logits, mask)
            del student_logits, teacher_logits
        else:
            loss = fused_token_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask)
        loss.backward()
        times.append(time.perf_counter() - start)
        value = float(loss.detach())
        student_hidden.grad = None
        student_weight.grad = None
        del loss
    peak = _peak_mib()
    return {"variant": variant, "vocab": vocab, "loss": value, "times_s": times, "threads": torch.get_num_threads(),
            "peak_mib": peak, "extra_mib": peak - with_inputs, "step_mib": peak - base}


def run_variant(variant: str, batch: int, seq_len: int, vocab: int, hidden: int, passes: int) -> dict:
    """One fresh single-threaded worker process; its figures, with the timed passes' median as ``time_s``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--batch", str(batch),
               "--seq-len", str(seq_len), "--vocab", str(vocab), "--hidden", str(hidden), "--passes", str(passes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker {variant} V={vocab} failed:\n{result.stderr}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    timed = figures["times_s"][1:] or figures["times_s"]
    figures["time_s"] = statistics.median(timed)
    return figures


VARIANTS = ("naive", "chunked", "naive_step", "fused")
PAIRS = (("chunked", "naive", "extra_mib"), ("fused", "naive_step", "step_mib"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small V and T: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (one process per variant each)")
    parser.add_argument("--passes", type=int, default=2, help="forward+backward passes per process (first untimed)")
    parser.add_argument("--vocab-sizes", default="50257,151936", help="comma-separated subset of 50257,151936")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))
        print(json.dumps(worker(args.worker, args.batch, args.seq_len, args.vocab, args.hidden, args.passes)))
        return
    if args.quick:
        settings = [(2, 64, 8000, 128)]
    else:  # GPT-2 (hidden 768) and Qwen2.5-0.5B (hidden 896) vocabularies
        hidden_of = {50257: 768, 151936: 896}
        settings = [(args.batch, args.seq_len, int(v), hidden_of[int(v)]) for v in args.vocab_sizes.split(",")]
    print(f"threads: 1 per worker (OMP_NUM_THREADS=1, torch.set_num_threads(1)); {args.repeats} interleaved "
          f"rounds x {args.passes} passes (first untimed); load average {os.getloadavg()[0]:.1f}", flush=True)
    for batch, seq_len, vocab, hidden in settings:
        rounds = []
        for round_index in range(args.repeats):
            figures = {}
            for variant in VARIANTS:
                figures[variant] = run_variant(variant, batch, seq_len, vocab, hidden, args.passes)
                assert figures[variant]["threads"] == 1
            print(f"  V={vocab} round {round_index + 1}: "
                  + ", ".join(f"{v} {figures[v]['time_s']:.2f}s/{figures[v]['step_mib']:.0f}MiB" for v in VARIANTS)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
            rel = abs(figures["naive"]["loss"] - figures["chunked"]["loss"])
            assert rel < 1e-3 * max(1, abs(figures["naive"]["loss"])), "chunked loss differs from naive"
            rel = abs(figures["naive_step"]["loss"] - figures["fused"]["loss"])
            assert rel < 1e-3 * max(1, abs(figures["naive_step"]["loss"])), "fused loss differs from naive_step"
            rounds.append(figures)
        med = {v: {key: statistics.median(r[v][key] for r in rounds) for key in ("time_s", "extra_mib", "step_mib")}
               for v in VARIANTS}
        print(f"{'V':>7} {'variant':>10} {'time s':>14} {'extra MiB':>10} {'step MiB':>9}  vs baseline")
        for name in VARIANTS:
            times = [r[name]["time_s"] for r in rounds]
            ratio = ""
            for variant, baseline, key in PAIRS:
                if variant == name:
                    ratios = [r[name]["time_s"] / r[baseline]["time_s"] for r in rounds]
                    ratio = (f"mem {med[name][key] / med[baseline][key]:.2f}x, time {statistics.median(ratios):.2f}x "
                             f"({min(ratios):.2f}-{max(ratios):.2f})")
            spread = f"{med[name]['time_s']:.2f} ({min(times):.1f}-{max(times):.1f})"
            print(f"{vocab:>7} {name:>10} {spread:>14} {med[name]['extra_mib']:>10.0f} {med[name]['step_mib']:>9.0f}  "
                  f"{ratio}", flush=True)


if __name__ == "__main__":
    main()
