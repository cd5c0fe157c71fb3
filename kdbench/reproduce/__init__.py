"""``kdbench reproduce NAME``: one seed paper's table, planned, run and compared with the published numbers.

A table is a ``reproductions/`` registry file (:mod:`kdbench.reproduce.schema`, read by
:mod:`kdbench.reproduce.table`); :mod:`kdbench.reproduce.plan` lists its stages with their compute and what is
already done; :mod:`kdbench.reproduce.mini` runs the miniature on the embedded synthetic world;
:mod:`kdbench.reproduce.compare` writes the comparison with the paper's column, the difference and whether the
paper's number lies inside kdbench's 95% CI over training seeds x examples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench.errors import ConfigError

SCALES = ("mini", "full")


@dataclass
class ReproduceResult:
    out_dir: Path
    plan_text: str
    report_md: str = ""
    comparison: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def default_out(name: str, scale: str) -> Path:
    return Path("runs") / f"reproduce-{name}-{scale}"


def plan_reproduction(name: str, *, scale: str = "full", out_dir: str | Path | None = None):
    """The plan of table ``name`` at ``scale`` (nothing is run): (plan, its text)."""
    from kdbench.reproduce.plan import build_plan, render_plan
    from kdbench.reproduce.table import load_table

    if scale not in SCALES:
        raise ConfigError(f"Unknown scale {scale!r}; choose one of: {', '.join(SCALES)}.")
    table = load_table(name)
    plan = build_plan(table, scale, Path(out_dir) if out_dir else default_out(name, scale))
    return plan, render_plan(plan)


def run_reproduction(name: str, *, scale: str = "mini", out_dir: str | Path | None = None,
                     cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                     progress: bool = True) -> ReproduceResult:
    """Run table ``name`` (cached and resumable: a rerun reuses every finished stage) and write
    ``reproduce.md``, ``comparison.csv``, ``reproduce.json`` and the full report under ``out_dir``.

    Every check (unknown table, unpinned revision at full scale, free disk) runs before any work."""
    from kdbench.reproduce.compare import compare, comparison_csv, comparison_markdown
    from kdbench.reproduce.plan import check_before_work
    from kdbench.store import atomic_write_json, atomic_write_text
    from kdbench.store.artifacts import default_cache_dir

    plan, text = plan_reproduction(name, scale=scale, out_dir=out_dir)
    check_before_work(plan, Path(cache_dir) if cache_dir else default_cache_dir())
    from kdbench.reproduce.full import run_pair
    from kdbench.reproduce.layout import slug
    from kdbench.reproduce.mini import STAND_INS, mini_preset, run_mini

    if scale == "mini":
        mini_preset(plan.table)  # its settings are checked before any work too
    say = log or (lambda message: None)
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.txt", text)
    cache = Path(cache_dir) if cache_dir else None
    if scale == "full":
        started, rows = time.time(), []
        for pair in plan.table.pairs:
            rows += compare(plan.table, pair, run_pair(plan.table, pair, out, cache, log=say, progress=progress))
        result = {"timings": {"total_seconds": round(time.time() - started, 1)}, "corpus_dir": None, "teacher_dir": None}
    else:
        result = run_mini(plan.table, out, cache, log=say, progress=progress)
        rows = compare(plan.table, plan.table.pairs[0], result["scores"])
    pair = plan.table.pairs[0]
    judge_note = ""
    if scale == "mini" and any(b.kind == "judge" for b in plan.table.benchmarks):
        judge_note = ("Judged benchmarks ran with the offline Rouge-L proxy judge against the teacher (deterministic), "
                      "not the paper's judge (" + ", ".join(sorted({b.judge_model or '?' for b in plan.table.benchmarks
                                                                     if b.kind == 'judge'})) + ").")
    if scale == "full":
        from kdbench.reproduce.judged import full_scale_note

        judge_note = full_scale_note(plan.table)
    used = {kind: STAND_INS[kind] for kind in dict.fromkeys(b.kind for b in plan.table.benchmarks)}
    markdown = comparison_markdown(plan.table, rows, scale=scale, stand_ins=used if scale == "mini" else None,
                                    judge_note=judge_note)
    atomic_write_text(out / "reproduce.md", markdown)
    atomic_write_text(out / "comparison.csv", comparison_csv(rows))
    atomic_write_json(out / "reproduce.json", {"table": name, "scale": scale,
                                               "pairs": [p.name for p in (plan.table.pairs if scale == "full" else [pair])],
                                               "timings": result["timings"], "corpus_dir": result["corpus_dir"],
                                               "teacher_dir": result["teacher_dir"],
                                               "rows": [r.__dict__ | {"difference": r.difference, "inside": r.inside}
                                                        for r in rows]})
    from kdbench.demo_report import demo_run_folders
    from kdbench.report import build_report

    bases = [out] if scale == "mini" else [out / slug(p.name) for p in plan.table.pairs]
    folders = [f for base in bases for f in demo_run_folders(base)]
    build_report(folders, out=out / "report", title=f"kdbench reproduce {name} --scale {scale}")
    say(f"comparison: {out / 'reproduce.md'}; full report: {out / 'report'}")
    return ReproduceResult(out, text, markdown, rows, result["timings"])


__all__ = ["SCALES", "ReproduceResult", "plan_reproduction", "run_reproduction"]
