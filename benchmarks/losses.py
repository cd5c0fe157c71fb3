"""Memory and time of kdbench's distillation losses: naive vs chunked-logits vs fused.

Each (variant, vocabulary) runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.
Forward + backward of forward KL at B=4, T=512 in bf16 (as real training feeds it):

* logits path: inputs are student/teacher logits [B, T, V]. ``naive`` is the usual code
  (log_softmax of float32 copies of the full tensors, autograd); ``chunked`` is ``kdbench.losses.fkl``.
  Reported: extra memory = peak − (RSS with the inputs allocated) − (the input gradient, B·T·V bf16).
* fused path: inputs are hidden states and ``lm_head`` weights. ``naive_step`` materializes both
  models' logits and runs the naive loss; ``fused`` is ``kdbench.losses.fused_token_loss``.
  Reported: whole-step peak = peak − (RSS before any input was allocated).

Targets (relative to naive in the same run): chunked extra ≤ 0.25×, fused whole-step peak ≤ 0.25×,
time ≤ 1.1×. Usage: ``python benchmarks/losses.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
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


def worker(variant: str, batch: int, seq_len: int, vocab: int, hidden: int, repeats: int) -> dict:
    """Run one variant (in this fresh process) and return its figures."""
    import torch

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
        for _ in range(repeats):
            start = time.perf_counter()
            loss = loss_fn(student, teacher, mask)
            loss.backward()
            times.append(time.perf_counter() - start)
            value = float(loss.detach())
            student.grad = None
            del loss
        grad_mib = student.numel() * 2 / 2**20
        peak = _peak_mib()
        return {"variant": variant, "vocab": vocab, "loss": value, "time_s": statistics.median(times),
                "peak_mib": peak, "extra_mib": peak - with_inputs - grad_mib, "step_mib": peak - base}
    student_hidden = _random_bf16((batch, seq_len, hidden), 3).requires_grad_()
    teacher_hidden = _random_bf16((batch, seq_len, hidden), 4)
    student_weight = _random_bf16((vocab, hidden), 5, 0.05).requires_grad_()
    teacher_weight = _random_bf16((vocab, hidden), 6, 0.05)
    with_inputs = _rss_mib()
    for _ in range(repeats):
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
    return {"variant": variant, "vocab": vocab, "loss": value, "time_s": statistics.median(times),
            "peak_mib": peak, "extra_mib": peak - with_inputs, "step_mib": peak - base}


def run_variant(variant: str, batch: int, seq_len: int, vocab: int, hidden: int, repeats: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--batch", str(batch),
               "--seq-len", str(seq_len), "--vocab", str(vocab), "--hidden", str(hidden), "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker {variant} V={vocab} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small V and T: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))
        print(json.dumps(worker(args.worker, args.batch, args.seq_len, args.vocab, args.hidden, args.repeats)))
        return
    if args.quick:
        settings = [(2, 64, 8000, 128)]
    else:  # GPT-2 (hidden 768) and Qwen2.5-0.5B (hidden 896) vocabularies
        settings = [(args.batch, args.seq_len, 50257, 768), (args.batch, args.seq_len, 151936, 896)]
    print(f"{'V':>7} {'variant':>10} {'time s':>8} {'extra MiB':>10} {'step MiB':>9} {'ratio':>22}")
    for batch, seq_len, vocab, hidden in settings:
        figures = {v: run_variant(v, batch, seq_len, vocab, hidden, args.repeats)
                   for v in ("naive", "chunked", "naive_step", "fused")}
        for name, baseline, key in (("naive", None, None), ("chunked", "naive", "extra_mib"),
                                    ("naive_step", None, None), ("fused", "naive_step", "step_mib")):
            row = figures[name]
            ratio = ""
            if baseline:
                ref = figures[baseline]
                ratio = (f"mem {row[key] / ref[key]:.2f}x time {row['time_s'] / ref['time_s']:.2f}x")
            print(f"{vocab:>7} {name:>10} {row['time_s']:>8.2f} {row['extra_mib']:>10.0f} {row['step_mib']:>9.0f} "
                  f"{ratio:>22}")
        assert abs(figures["naive"]["loss"] - figures["chunked"]["loss"]) < 1e-3 * max(1, abs(figures["naive"]["loss"]))


if __name__ == "__main__":
    main()
