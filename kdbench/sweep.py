"""Training seeds and hyperparameter sweeps: one command, several runs.

``expand(values, seeds=[1, 2, 3], sweeps=["params.beta1=0.01,0.1,1", "params.beta2=0.001,0.1"])``
returns one (run name, settings) pair per point of the grid × seed, e.g. daDPO's β1 × β2 grid or
ADPA's γ grid. Run names carry the swept values, so reports group runs of the same point (its
training seeds) into one row.
"""

from __future__ import annotations

import itertools
from typing import Any

from kdbench.config import apply_overrides, parse_override
from kdbench.errors import ConfigError


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"params.beta1=0.01,0.1,1"`` -> ("params.beta1", [0.01, 0.1, 1])."""
    if "=" not in text:
        raise ConfigError(f"Sweep {text!r} must look like key=v1,v2,... e.g. --sweep params.beta2=0.01,0.1.")
    key, raw = text.split("=", 1)
    values = [parse_override(f"{key}={item}")[1] for item in raw.split(",") if item.strip()]
    if not values:
        raise ConfigError(f"Sweep {text!r} lists no values.")
    return key.strip(), values


def _short(key: str, value: Any) -> str:
    return f"{key.split('.')[-1]}{value:g}" if isinstance(value, float) else f"{key.split('.')[-1]}{value}"


def expand(values: dict, *, method: str, seeds: list[int] | None = None, sweeps: list[str] | None = None,
           run_name: str | None = None) -> list[tuple[str, dict]]:
    """Every (run name, settings) of the grid × seeds; a single run when neither is given."""
    grid = [parse_sweep(s) for s in sweeps or []]
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError("Each setting may be swept once; merge its values into one --sweep.")
    seeds = seeds or [values.get("seed", 1)]
    base = run_name or values.get("run_name") or method
    runs = []
    for point in itertools.product(*(v for _, v in grid)) if grid else [()]:
        overrides = [f"{k}={v}" for k, v in zip(keys, point)]
        tag = "-".join(_short(k, v) for k, v in zip(keys, point))
        for seed in seeds:
            name = "-".join(filter(None, [base, tag, f"seed{seed}"]))
            settings = apply_overrides(values, overrides)
            settings.update(seed=seed, run_name=name)
            runs.append((name, settings))
    return runs
