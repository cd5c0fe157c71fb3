"""Test-wide settings.

torch's default intra-op thread pool oversubscribes a small shared CPU (other processes, the
2-process data-parallel tests): tiny operations then run orders of magnitude slower. Tests use one
thread unless KDBENCH_TEST_THREADS says otherwise; results do not depend on it beyond float noise.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("KDBENCH_TEST_THREADS", "1"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

try:
    import torch

    torch.set_num_threads(int(os.environ.get("KDBENCH_TEST_THREADS", "1")))
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------------------------------ skips
# A test skips when something it needs is absent (../shared, Chromium, TRL, lm-eval, the SmolLM2
# package). CI installs or provides all of these, so there a skip means CI lost something and must not
# pass silently: .ci/run sets KDBENCH_REQUIRE_ALL=1, which turns every skip into a failure naming what
# is missing. A plain `pytest` still skips, and its summary says how many tests skipped and why.
import pytest  # noqa: E402

REQUIRE_ALL = os.environ.get("KDBENCH_REQUIRE_ALL", "") not in ("", "0")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"KDBENCH_REQUIRE_ALL=1 (CI) forbids skipping, and {item.nodeid} skipped: "
                           f"{_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped:  # a module-level skip (pytest.skip(allow_module_level=True), importorskip)
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"KDBENCH_REQUIRE_ALL=1 (CI) forbids skipping, and {report.nodeid} skipped: {reason}"


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        reason = _skip_reason(report)
        reasons[reason] = reasons.get(reason, 0) + 1
    terminalreporter.write_sep("-", f"{len(skipped)} skipped (CI fails on these: KDBENCH_REQUIRE_ALL=1)")
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{count:4d}  {reason}")


@pytest.fixture(scope="session")
def wiring_world(tmp_path_factory):
    """Models and data of the wiring tests (tests/wiring_reference.py), built once per session."""
    from wiring_reference import build_world

    return build_world(tmp_path_factory.mktemp("wiring"))
