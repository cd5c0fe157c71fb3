"""The HTML report in a real browser: Debian's headless Chromium loads it without console messages, renders
every table, draws every plot (each image decoded, non-empty, and visibly not blank in a screenshot), keeps
wide tables scrolling inside their box at 1280 px, and writes a screenshot as a test artifact.

Chromium is installed by ``.ci/run`` (apt), never by the tests; without it these tests skip. The
screenshot goes to ``$KDBENCH_TEST_ARTIFACTS`` (default ``runs/test-artifacts/``, git-ignored).
"""

from __future__ import annotations

import html
import json
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
WIDTH = 1280

# Injected into a copy of the page (the report itself runs no script): after load, what the browser made of
# every image and table box, written into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, r.width, r.height]; };
  const images = [...document.images].map((img) => ({id: img.closest("figure").id, complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight, box: box(img)}));
  const tables = [...document.querySelectorAll("div.table-wrap")].map((div) => ({id: div.querySelector("table").id,
    scroll: div.scrollWidth, client: div.clientWidth, overflow: getComputedStyle(div).overflowX}));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images, tables, page_width: document.documentElement.scrollWidth,
                                      page_height: document.documentElement.scrollHeight});
  document.body.appendChild(probe);
});
</script>"""


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               # any attempt to reach the network fails loudly instead of waiting
               "--host-resolver-rules=MAP * ~NOTFOUND", *extra, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _console_messages(stderr: str) -> list[str]:
    return [match.group(1) for line in stderr.splitlines() if (match := CONSOLE.search(line))]


def _wide_judged_run(root: Path) -> None:
    """A judged suite with 24 category columns: a table wider than the page, which must scroll in its box."""
    from kdbench.judging import mt_bench as mtb
    from kdbench.judging.runs import finish_run, open_run

    records = [{"model": "kd", "question_id": q, "turn": 1, "score": float(q % 9 + 1),
                "category": f"a-rather-long-category-{q:02d}"} for q in range(24)]
    run = open_run(root / "judge-wide", protocol="mt_bench", config={"inputs": ["wide.jsonl"]}, command=["pytest"])
    finish_run(run, judgments=records, usage=None, label="kd", judge="gpt-4", judge_label="LLM judge gpt-4",
               metrics=mtb.metric_records(run, mtb.summarize(records), judge="gpt-4", protocol="mt_bench",
                                          suite="mt_bench_wide"))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("browser")
    runs = build_reference_runs(root)
    build_oll_run(root / "oll", "kd", arc=0.40)
    build_judge_results(root / "judge", runs["kd"][0].path, runs["teacher"][0].path)
    _wide_judged_run(root / "judge")
    result = build_report([root], out=root / "out", formats=["html"], compare_papers=True)
    return result.paths["html"], result.tables, result.figures


def test_console_capture_sees_errors(tmp_path):
    """The check below can fail: a page that logs and throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<script>console.error("report-broken"); missingFunction();</script></body></html>')
    messages = _console_messages(_chromium(bad, tmp_path / "profile", "--dump-dom").stderr)
    assert any("report-broken" in m for m in messages) and any("missingFunction" in m for m in messages)


def _probe(html_path: Path, tmp_path: Path) -> dict:
    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(probed, tmp_path / "profile-probe", f"--window-size={WIDTH},900", "--virtual-time-budget=10000",
                    "--dump-dom")
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stderr[-2000:]
    return json.loads(html.unescape(match.group(1)))


def test_report_renders_tables_and_non_empty_plots(page, tmp_path):
    from PIL import Image, ImageStat

    html_path, tables, figures = page
    probe = _probe(html_path, tmp_path)
    # every figure is an image the browser decoded, at a sensible size
    assert sorted(image["id"] for image in probe["images"]) == sorted(figures) and len(figures) >= 6
    for image in probe["images"]:
        assert image["complete"] and image["width"] >= 300 and image["height"] >= 100, image
        assert image["box"][2] > 100 and image["box"][3] > 50, image
    # wide tables scroll inside their box; the page itself never runs off the right edge at 1280 px
    assert probe["page_width"] <= WIDTH, probe["page_width"]
    assert {t["overflow"] for t in probe["tables"]} == {"auto"}
    wide = [t for t in probe["tables"] if t["scroll"] > t["client"]]
    assert "judged-mt_bench_wide-category" in {t["id"] for t in wide}
    assert sorted(t["id"] for t in probe["tables"]) == sorted(tables)

    height = min(int(probe["page_height"]) + 50, 16000)
    screenshot = tmp_path / "report.png"
    shot = _chromium(html_path, tmp_path / "profile-shot", f"--window-size={WIDTH},{height}",
                     f"--screenshot={screenshot}")
    assert _console_messages(shot.stderr) == [], shot.stderr[-2000:]
    rendered = Image.open(screenshot).convert("RGB")
    assert rendered.size[0] == WIDTH
    for image in probe["images"]:  # the plot is visibly drawn there: many colours, not a flat area
        left, top, width, height_ = (int(v) for v in image["box"])
        if top + height_ > rendered.size[1]:
            continue
        region = rendered.crop((left, top, left + width, top + height_))
        assert len(region.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, image["id"]
        assert max(ImageStat.Stat(region).stddev) > 10, image["id"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "report-screenshot.png")
    shutil.copy(html_path, ARTIFACTS / "report.html")

    dom = _chromium(html_path, tmp_path / "profile-dom", "--dump-dom")
    assert _console_messages(dom.stderr) == [], dom.stderr[-2000:]
    assert dom.stdout.count("<img") == html_path.read_text().count("<img") > 0
