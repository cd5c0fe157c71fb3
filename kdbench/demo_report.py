"""What every demo writes besides its leaderboard: the students' win rate ω against the teacher, judged through
:func:`kdbench.judge` into judge runs, and ``report.html`` over all of the demo's runs; and the result record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class DemoResult:
    out_dir: Path
    leaderboard_md: str
    timings: dict = field(default_factory=dict)
    teacher_reused: bool = False
    report_html: Path | None = None


def judge_against_teacher(out: Path, students: list[tuple[str, str]], offline: str, *, suite: str | None = None,
                          teacher_run: str = "teacher", tie_margin: float | None = None,
                          log: Callable[[str], None] | None = None) -> list:
    """ω of each evaluated student against the teacher, with the offline judge, through :func:`kdbench.judge`:
    one judge run ``out/judge/<run>-vs-teacher`` per student eval run ``out/eval/<run>`` against the teacher's
    ``out/eval/<teacher_run>`` (``students`` holds (label, eval run name) pairs)."""
    from kdbench.judging.api import judge

    results = []
    for label, name in students:
        outcome = judge("pairwise", student=str(out / "eval" / name), teacher=str(out / "eval" / teacher_run),
                        suite=suite, offline=offline, tie_margin=tie_margin, out=str(out / "judge" / f"{name}-vs-teacher"),
                        labels={"student": label, "teacher": "teacher"}, command=["kdbench", "demo"])
        if log:
            log(outcome.message)
        results.append(outcome)
    return results


def demo_run_folders(out: Path) -> list[Path]:
    """The demo's run folders that exist (eval, train, judge)."""
    return [out / name for name in ("eval", "train", "judge") if (out / name).is_dir()]


def write_report_html(out: Path, title: str) -> Path:
    """``report.html`` (every table and figure of the demo's runs; one self-contained file) next to
    ``leaderboard.md``, its figures also as ``plots/*.png``."""
    from kdbench.report import build_report

    result = build_report(demo_run_folders(out), out=out, formats=["html"], title=title)
    return result.paths["html"]


__all__ = ["DemoResult", "judge_against_teacher", "demo_run_folders", "write_report_html"]
