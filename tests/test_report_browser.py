"""The HTML report in a real browser: Debian's headless Chromium loads it without console messages,
renders every table, and writes a screenshot as a test artifact.

Chromium is installed by ``.ci/run`` (apt), never by the tests; without it these tests skip. The
screenshot goes to ``$KDBENCH_TEST_ARTIFACTS`` (default ``runs/test-artifacts/``, git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kdbench.report import build_report
from report_fixtures import build_judge_results, build_oll_run, build_reference_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it "
                                                          "with apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("KDBENCH_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "runs" / "test-artifacts")
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\]\s*(.*)")


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               # any attempt to reach the network fails loudly instead of waiting
               "--host-resolver-rules=MAP * ~NOTFOUND", *extra, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    return [match.group(1) for line in stderr.splitlines() if (match := CONSOLE.search(line))]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("browser")
    runs = build_reference_runs(root)
    build_oll_run(root / "oll", "kd", arc=0.40)
    build_judge_results(root / "judge", runs["kd"][0].path, runs["teacher"][0].path)
    result = build_report([root], out=root / "out", formats=["html"], compare_papers=True)
    return result.paths["html"], result.tables


def test_console_capture_sees_errors(tmp_path):
    """The check below can fail: a page that logs and throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<script>console.error("report-broken"); missingFunction();</script></body></html>')
    messages = _console_messages(_chromium(bad, tmp_path / "profile", "--dump-dom").stderr)
    assert any("report-broken" in m for m in messages) and any("missingFunction" in m for m in messages)


def test_report_renders_without_console_errors(page, tmp_path):
    html_path, tables = page
    screenshot = tmp_path / "report.png"
    shot = _chromium(html_path, tmp_path / "profile-shot", "--window-size=1280,4000", f"--screenshot={screenshot}")
    assert _console_messages(shot.stderr) == [], shot.stderr[-2000:]
    assert screenshot.is_file() and screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "report-screenshot.png")
    shutil.copy(html_path, ARTIFACTS / "report.html")

    dom = _chromium(html_path, tmp_path / "profile-dom", "--dump-dom")
    assert _console_messages(dom.stderr) == [], dom.stderr[-2000:]
    for table_id in tables:
        assert f'id="{table_id}"' in dom.stdout, f"table {table_id} missing from the rendered page"
    assert dom.stdout.count("<img") == html_path.read_text().count("<img") > 0
