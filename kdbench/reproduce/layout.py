"""Where a reproduction writes each stage (one place, read by the planner and the runner alike)."""

from __future__ import annotations

import re
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of a row label or pair name (``FKL+RKL`` -> ``fkl-plus-rkl``, ``ADPA+`` ->
    ``adpa-plus``: a + is kept as a word, so ADPA and ADPA+ never share a folder)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower().replace("+", " plus ")).strip("-") or "row"


def _row_slug(label: str) -> str:
    return slug(label)


def train_dir(base: Path, row, seed: int) -> Path:
    """The training run of ``row`` at ``seed``."""
    return base / "train" / f"{_row_slug(row.label)}-seed{seed}"


def eval_dir(base: Path, row, seed: int | None) -> Path:
    """The evaluation run of ``row`` (``seed`` None: an evaluated-only row, teacher or student)."""
    name = _row_slug(row.label) if seed is None else f"{_row_slug(row.label)}-seed{seed}"
    return base / "eval" / name


__all__ = ["slug", "train_dir", "eval_dir"]
