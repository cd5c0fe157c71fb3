"""Report figures as PNG bytes (matplotlib's Agg canvas; no pyplot state, no display needed).

matplotlib is a core dependency, so every report draws its figures: per suite a forest plot of every
model's score with its 95% CI and the baseline as a line, the score by response-length bucket (DPKD Fig. 5),
the score against training cost (teacher forward tokens, else wall time); for judged suites the win / tie /
loss bars; training-loss curves from ``train_log.jsonl``. :func:`available` still guards against a broken
install (the report then says so instead of failing).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from kdbench.report.collect import ReportData, Stat, reference_stat, row_costs, subsets, train_log

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


def forest_figure(suite: str, metric: str, stats: dict[str, Stat], order: list[str],
                  baseline_label: str | None = None) -> Figure | None:
    """A forest plot: one row per model (best on top), its mean as a dot and its 95% CI as a line, with the
    baseline's mean as a vertical dashed line and its CI shaded."""
    labels = [label for label in order if label in stats]
    if not labels:
        return None
    figure = _new_figure(7.0, 0.9 + 0.38 * len(labels))
    axes = figure.add_subplot()
    positions = list(range(len(labels)))[::-1]  # first label at the top
    for y, label in zip(positions, labels):
        stat = stats[label]
        colour = "C3" if label == baseline_label else "C0"
        if stat.ci:
            axes.plot([stat.ci[0], stat.ci[1]], [y, y], color=colour, linewidth=2.0, solid_capstyle="butt")
        axes.plot([stat.mean], [y], marker="o", color=colour, markersize=6)
    baseline = stats.get(baseline_label) if baseline_label else None
    if baseline is not None:
        axes.axvline(baseline.mean, color="C3", linestyle="--", linewidth=1.0, label=f"{baseline_label} (baseline)")
        if baseline.ci:
            axes.axvspan(baseline.ci[0], baseline.ci[1], color="C3", alpha=0.08)
        axes.legend(fontsize="small", loc="lower right", frameon=False)
    axes.set_yticks(positions, labels)
    axes.set_xlabel(f"{metric} (95% CI)")
    axes.set_title(f"{suite}: {metric}")
    axes.grid(axis="x", alpha=0.3)
    return Figure(f"fig-forest-{suite}-{metric}", f"{suite}: {metric} forest plot", _png(figure),
                  f"{metric} per model (dot: mean; line: 95% bootstrap CI over examples)"
                  + (f"; dashed line and band: the {baseline_label} baseline's mean and CI." if baseline else "."))


def cost_figure(data: ReportData, suite: str, metric: str, stats: dict[str, Stat]) -> Figure | None:
    """Score against training cost per model: teacher forward tokens when every point has them, else wall time."""
    points = []
    for label, stat in stats.items():
        costs = row_costs(data, label)
        if costs:
            points.append((label, stat, costs))
    if len(points) < 2:
        return None
    use_tokens = all(any(c.get("teacher_forward_tokens") for c in costs) for _, _, costs in points)
    key, axis = ("teacher_forward_tokens", "teacher forward tokens") if use_tokens else ("wall_seconds", "training wall time (s)")
    figure = _new_figure(6.0, 3.6)
    axes = figure.add_subplot()
    for index, (label, stat, costs) in enumerate(points):
        values = [float(c[key]) for c in costs if c.get(key) is not None]
        if not values:
            continue
        x = sum(values) / len(values)
        low, high = stat.ci if stat.ci else (stat.mean, stat.mean)
        axes.errorbar([x], [stat.mean], yerr=[[stat.mean - low], [high - stat.mean]], fmt="o", color=f"C{index % 10}",
                      capsize=3)
        axes.annotate(label, (x, stat.mean), textcoords="offset points", xytext=(5, 4), fontsize="small")
    axes.set_xlabel(axis)
    axes.set_ylabel(metric)
    axes.set_title(f"{suite}: {metric} vs training cost")
    axes.grid(alpha=0.3)
    return Figure(f"fig-cost-{suite}-{metric}", f"{suite}: {metric} vs cost", _png(figure),
                  f"{metric} (95% CI) against the mean {axis} of each model's training runs (cost.json).")


def wtl_figure(suite: str, rows: list[tuple[str, float, float, float]]) -> Figure | None:
    """Stacked horizontal win / tie / loss bars, one per judged row (shares of the judged items)."""
    rows = [row for row in rows if row[1] + row[2] + row[3] > 0]
    if not rows:
        return None
    figure = _new_figure(7.0, 0.9 + 0.42 * len(rows))
    axes = figure.add_subplot()
    positions = list(range(len(rows)))[::-1]
    for y, (name, wins, ties, losses) in zip(positions, rows):
        total = wins + ties + losses
        left = 0.0
        for value, colour, text in ((wins, "#2e7d32", "W"), (ties, "#9e9e9e", "T"), (losses, "#c62828", "L")):
            share = 100 * value / total
            axes.barh([y], [share], left=left, color=colour, height=0.6,
                      label=text if y == positions[0] else None)
            if share >= 8:
                axes.text(left + share / 2, y, f"{value:.0f}", ha="center", va="center", color="white",
                          fontsize="small")
            left += share
    axes.set_yticks(positions, [row[0] for row in rows])
    axes.set_xlim(0, 100)
    axes.set_xlabel("share of judged items (%)")
    axes.set_title(f"{suite}: wins / ties / losses")
    axes.legend(fontsize="small", ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    return Figure(f"fig-wtl-{suite}", f"{suite}: win / tie / loss", _png(figure),
                  "Wins, ties and losses of each judged row against its opponent (numbers: counts; failed judgments "
                  "excluded).")


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
