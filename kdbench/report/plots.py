"""Report figures as PNG bytes (matplotlib's Agg canvas; no pyplot state, no display needed).

matplotlib is optional (``pip install 'kdbench[report]'``): :func:`available` says whether it can be
imported, and the report prints a note instead of the figures when it cannot.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from kdbench.report.collect import ReportData, Stat, reference_stat, subsets, train_log

# train_log.jsonl keys plotted besides the loss, with their titles (DPKD Fig. 3-4: implicit reward and
# reverse KL over training; TRL's DPO keys; kdbench's per-token loss components).
CURVE_KEYS = {
    "loss": "training loss",
    "eval_loss": "validation loss",
    "rkl_per_token": "reverse KL per token",
    "reverse_kl": "reverse KL",
    "reverse_kl_per_token": "reverse KL per token",
    "implicit_reward": "implicit reward",
    "implicit_reward_per_token": "implicit reward per token",
    "rewards/chosen": "implicit reward (chosen)",
    "rewards/margins": "implicit reward margin",
}


@dataclass
class Figure:
    id: str
    title: str
    png: bytes
    caption: str


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # no Software/URL text chunk: the report holds no external address, even inside an image
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _errors(stats: list[Stat | None]) -> tuple[list[float], list[list[float]]]:
    """Bar heights and asymmetric CI error bars (shape [2, k]); NaN where a row has no number."""
    heights, low, high = [], [], []
    for stat in stats:
        if stat is None:
            heights.append(math.nan)
            low.append(0.0)
            high.append(0.0)
            continue
        heights.append(stat.mean)
        if stat.ci:
            low.append(max(0.0, stat.mean - stat.ci[0]))
            high.append(max(0.0, stat.ci[1] - stat.mean))
        else:
            low.append(0.0)
            high.append(0.0)
    return heights, [low, high]


def bucket_figure(data: ReportData, suite: str, metric: str, labels: list[str]) -> Figure | None:
    """Metric by length bucket per model, grouped bars with 95% CIs (DPKD Fig. 5)."""
    buckets = subsets(data, suite, "bucket")
    if not buckets or not labels:
        return None
    figure = _new_figure(max(6.0, 1.2 + 0.45 * len(buckets) * len(labels)), 3.6)
    axes = figure.add_subplot()
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        stats = [reference_stat(data.runs_of(label), suite, metric, bucket) for bucket in buckets]
        heights, errors = _errors(stats)
        positions = [b + (index - (len(labels) - 1) / 2) * width for b in range(len(buckets))]
        axes.bar(positions, heights, width=width * 0.95, yerr=errors, capsize=2, label=label)
    sizes = [next((s.n for label in labels if (s := reference_stat(data.runs_of(label), suite, metric, b))), None)
             for b in buckets]
    axes.set_xticks(range(len(buckets)),
                    [f"{b.split(':', 1)[1]}\nn={n}" if n else b.split(":", 1)[1] for b, n in zip(buckets, sizes)])
    axes.set_xlabel("reference length (words)")
    axes.set_ylabel(metric)
    axes.set_title(f"{suite}: {metric} by length bucket")
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    axes.grid(axis="y", alpha=0.3)
    return Figure(f"fig-bucket-{suite}-{metric}", f"{suite}: {metric} by length bucket", _png(figure),
                  f"{metric} per reference-length bucket and model, error bars: 95% bootstrap CI over examples "
                  "(as DPKD Fig. 5).")


def suite_bars_figure(suite: str, metric: str, stats: dict[str, Stat], order: list[str]) -> Figure | None:
    """One bar per model with its 95% CI."""
    labels = [label for label in order if label in stats]
    if not labels:
        return None
    figure = _new_figure(max(4.5, 1.0 + 0.7 * len(labels)), 3.2)
    axes = figure.add_subplot()
    heights, errors = _errors([stats[label] for label in labels])
    colors = [f"C{i % 10}" for i in range(len(labels))]
    axes.bar(range(len(labels)), heights, yerr=errors, capsize=4, color=colors)
    axes.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 5 else 0, ha="right" if len(labels) > 5 else "center")
    axes.set_ylabel(metric)
    axes.set_title(f"{suite}: {metric} (95% CI)")
    axes.grid(axis="y", alpha=0.3)
    return Figure(f"fig-bars-{suite}-{metric}", f"{suite}: {metric}", _png(figure),
                  f"{metric} per model; error bars: 95% bootstrap CI over examples.")


def training_curves_figure(data: ReportData) -> Figure | None:
    """Training loss (and implicit reward / reverse KL when logged) against optimizer step, per run."""
    logs = [(run, [r for r in train_log(run) if "step" in r]) for run in data.train_runs]
    logs = [(run, records) for run, records in logs if records]
    if not logs:
        return None
    keys = [key for key in CURVE_KEYS if any(key in r for _, records in logs for r in records)]
    if not keys:
        return None
    figure = _new_figure(min(4.2 * len(keys), 13.0), 3.2 * math.ceil(len(keys) / 3))
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(run.label for run, _ in logs))}
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        seen = set()
        for run, records in logs:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            axes.plot(steps, values, color=colors[run.label], alpha=0.85, linewidth=1.2,
                      label=None if run.label in seen else run.label)
            seen.add(run.label)
        axes.set_title(CURVE_KEYS[key], fontsize="medium")
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize="small")
    return Figure("fig-training", "Training curves", _png(figure),
                  "Per training run (one line per training seed, one colour per model), as logged in train_log.jsonl.")
