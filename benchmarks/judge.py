"""Judge-client throughput: 805 judgments against the local fake server at a fixed latency per call.

Measures, in one run: the sequential wall time (concurrency 1), the concurrent wall time (default 32), the
speed-up, and that a rerun over the same calls makes zero requests (all from the cache).

    python benchmarks/judge.py [--n 805] [--latency-ms 100] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from judge_server import FakeJudgeServer  # noqa: E402

from kdbench.judging.client import ClientSettings, JudgeCall, JudgeClient  # noqa: E402

KEY = "sk-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=805)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    calls = lambda tag: [JudgeCall.make([{"role": "user", "content": f"{tag} instruction {i} [[rating]]"}],  # noqa: E731
                                        temperature=0, max_tokens=16) for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp, FakeJudgeServer(api_key=KEY, latency_s=args.latency_ms / 1000) as server:
        def run(tag: str, concurrency: int) -> tuple[float, JudgeClient]:
            client = JudgeClient(ClientSettings(model="gpt-4", base_url=server.url, concurrency=concurrency),
                                 cache_path=Path(tmp) / f"{tag}.jsonl", api_key=KEY)
            started = time.perf_counter()
            replies = client.complete(calls(tag))
            assert all(r.ok for r in replies)
            return time.perf_counter() - started, client

        sequential_s, _ = run("sequential", 1)
        concurrent_s, _ = run("concurrent", args.concurrency)
        before = server.total_calls()
        rerun_s, rerun = run("concurrent", args.concurrency)
        rerun_calls = server.total_calls() - before
    print(f"{args.n} judgments, {args.latency_ms:.0f} ms per call")
    print(f"sequential (concurrency 1): {sequential_s:.2f} s")
    print(f"concurrent (concurrency {args.concurrency}): {concurrent_s:.2f} s  speed-up {sequential_s / concurrent_s:.1f}x "
          f"(ideal {min(args.concurrency, args.n)}x)")
    print(f"rerun: {rerun_calls} calls to the server, {rerun.stats.calls_cached} from cache, {rerun_s:.2f} s")


if __name__ == "__main__":
    main()
