"""``kdbench reproduce NAME``: the CLI side of :mod:`kdbench.reproduce` (parse, call the library, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer


def make_reproduce(say: Callable[[str], None], quiet_libraries: Callable[[], None]):
    """The ``reproduce`` command, logging through the root CLI's ``say`` (progress on stderr) after its
    ``quiet_libraries`` (kdbench.cli registers it; this module never imports the root CLI)."""

    def reproduce(
        name: str = typer.Argument(..., help="Table to reproduce (kdbench list reproductions)."),
        scale: str = typer.Option("mini", "--scale", help="mini: tiny stand-in models and data, minutes on a CPU; "
                                                          "full: the paper's checkpoints and data."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print every stage with its estimated compute and what is "
                                                              "already done; run nothing."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/reproduce-NAME-SCALE)."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Artifact cache (default: $KDBENCH_CACHE or "
                                                                           "~/.cache/kdbench)."),
    ):
        """Reproduce a seed paper's table: run its stages (cached, resumable) and compare with the published numbers."""
        from kdbench.reproduce import plan_reproduction, run_reproduction

        if dry_run:
            _, text = plan_reproduction(name, scale=scale, out_dir=out)
            typer.echo(text, nl=False)
            return
        quiet_libraries()
        result = run_reproduction(name, scale=scale, out_dir=out, cache_dir=cache_dir, log=say)
        typer.echo(result.report_md, nl=False)
        typer.echo(f"comparison: {result.out_dir / 'reproduce.md'} (total {result.timings.get('total_seconds', 0):.0f}s)")

    return reproduce


__all__ = ["make_reproduce"]
