"""What an embedded-benchmark run shows, as Markdown: budgets and compute per arm, the validity
controls, the minimum detectable effects, and the agreement of two runs on different worlds.

Reads the folder written by :func:`kdbench.demo.run_demo` (``demo.json`` lists every arm's training and
evaluation run); the statistics are :mod:`kdbench.validity`'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from kdbench.validity import ALPHA, POWER, Contrast, ControlVerdict, contrast, fmt_p, holm_adjust

TEACHER_SEED = 0  # the teacher is trained once; its runs carry this seed in the tables
TARGET_MDE = 2.0  # Rouge-L points: the papers' reported gains between methods are 1-3 points
METRIC_SUITES = {"rougeL": "synthetic", "exact_match": "synthetic", "token_accuracy": "synthetic-ref",
                 "pair_accuracy": "synthetic-ref"}
METRIC_TITLES = {"rougeL": "Rouge-L", "exact_match": "exact match", "token_accuracy": "teacher-forced token accuracy",
                 "pair_accuracy": "pair accuracy (right answer more likely than the plausible wrong one)"}
READINGS = ("rougeL", "token_accuracy", "pair_accuracy")


@dataclass
class ArmRuns:
    label: str
    method: str
    start: str
    control: str | None
    seeds: dict[int, dict]  # seed -> {"train": path or None, "eval": path}


def load_arms(out: Path) -> list[ArmRuns]:
    """The arms of a demo folder, in leaderboard order (teacher first)."""
    info = json.loads((Path(out) / "demo.json").read_text())
    arms: dict[str, ArmRuns] = {}
    for row in info["runs"]:
        arm = arms.setdefault(row["label"], ArmRuns(row["label"], row.get("method", ""), row.get("start", ""),
                                                    row.get("control"), {}))
        arm.seeds[row["seed"]] = {"train": row.get("train"), "eval": row["eval"]}
    return list(arms.values())


def arm_scores(arm: ArmRuns, metric: str = "rougeL", subset: str = "all") -> dict[int, list[float]]:
    """Training seed -> per-example scores (mean over generation seeds), examples in the test set's order."""
    from kdbench.report.collect import subset_members

    suite = METRIC_SUITES[metric]
    out = {}
    for seed, runs in arm.seeds.items():
        scores = json.loads((Path(runs["eval"]) / "scores" / f"{suite}.json").read_text())
        members = subset_members(scores, subset)
        per_seed = list(scores["scores"][metric].values())
        out[seed] = [sum(values[i] for values in per_seed) / len(per_seed) for i in members]
    return out


def arm_cost(arm: ArmRuns) -> dict:
    """Mean over seeds of the training run's steps and compute (``cost.json``); empty for the teacher."""
    costs = []
    for runs in arm.seeds.values():
        if runs.get("train"):
            path = Path(runs["train"]) / "cost.json"
            if path.is_file():
                costs.append(json.loads(path.read_text()))
    if not costs:
        return {}

    def mean(key: str) -> float:
        return sum(float(c.get(key) or 0) for c in costs) / len(costs)

    selected = [_checkpoint_step(c.get("selected_checkpoint")) or c.get("optimizer_steps") for c in costs]
    return {"steps": mean("optimizer_steps"), "selected": sum(selected) / len(selected),
            "tokens": mean("tokens_processed"),
            "teacher_tokens": mean("teacher_forward_tokens") + mean("teacher_cache_forward_tokens"),
            "generated": mean("generated_tokens"), "seconds": mean("wall_seconds"), "runs": len(costs)}


def _checkpoint_step(path: str | None) -> int | None:
    if not path:
        return None
    tail = Path(path).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _num(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _int(value: float | None) -> str:
    return "-" if value is None else f"{round(value):,}"


def compute_markdown(arms: list[ArmRuns]) -> str:
    """Steps and compute per arm (means over training seeds), for the leaderboard."""
    rows = []
    for arm in arms:
        cost = arm_cost(arm)
        if not cost:
            continue
        rows.append([arm.label, arm.start or "-", f"{_int(cost['selected'])} / {_int(cost['steps'])}",
                     _int(cost["tokens"]), _int(cost["teacher_tokens"]), _int(cost["generated"]),
                     _num(cost["seconds"])])
    if not rows:
        return ""
    lines = ["## Training budget and compute", "",
             *_table(["model", "starts from", "kept step / steps", "training tokens", "teacher forward tokens",
                      "generated tokens", "wall s"], rows), "",
             "Means over training seeds. Training tokens count every token the student processed (prompts and "
             "responses, every step); a model that starts from another (preference arms from SFT) adds that "
             "model's cost to its own. Wall time is machine- and load-dependent."]
    return "\n".join(lines) + "\n"


def _students(arms: list[ArmRuns]) -> list[ArmRuns]:
    return [a for a in arms if a.label != "teacher"]


def control_verdicts(arms: list[ArmRuns], metric: str = "rougeL") -> list[ControlVerdict]:
    """The positive and negative controls the run's arms allow (Holm across all of them)."""
    by_label = {a.label: a for a in arms}
    scores = {a.label: arm_scores(a, metric=metric) for a in arms}
    wanted: list[tuple[str, str, str, str]] = []  # (name, kind, a, b)
    if "sft_all" in by_label and "sft" in by_label:
        wanted.append(("SFT on all labelled data beats SFT on the labelled subset", "positive", "sft_all", "sft"))
    for teacher_data in ("dsft", "seqkd"):
        if teacher_data in by_label and "sft" in by_label:
            wanted.append((f"{teacher_data} on the teacher's answers to the unlabelled prompts beats SFT", "positive",
                           teacher_data, "sft"))
    if "teacher" in by_label:
        wanted += [(f"the teacher beats {s.label}", "positive", "teacher", s.label) for s in _students(arms)]
    for meaningless in ("kd_permuted", "kd_untrained"):
        if meaningless in by_label and "sft" in by_label:
            what = "a permuted" if meaningless == "kd_permuted" else "an untrained"
            wanted.append((f"KD against {what} teacher does not beat SFT", "negative", meaningless, "sft"))
    if "dpo_swapped" in by_label and "dpo" in by_label:
        wanted.append(("DPO with chosen and rejected swapped scores below DPO", "negative_below", "dpo_swapped", "dpo"))
    contrasts = holm_adjust([contrast(a, scores[a], b, scores[b]) for _, _, a, b in wanted])
    verdicts = []
    for (name, kind, _, _), c in zip(wanted, contrasts):
        if kind == "negative_below":
            verdict = ControlVerdict(name, "negative", c)
            verdict.passed = c.effect < 0
        else:
            verdict = ControlVerdict(name, kind, c)
        verdicts.append(verdict)
    return verdicts


def controls_markdown(verdicts: list[ControlVerdict]) -> list[str]:
    rows = []
    for v in verdicts:
        c = v.contrast
        per_seed = "; ".join(f"s{e.seed}: {e.effect:+.1f} [{e.ci[0]:+.1f}, {e.ci[1]:+.1f}] p {fmt_p(e.p_holm)}"
                             for e in c.per_seed)
        rows.append([v.name, v.kind, f"{c.effect:+.1f} [{c.ci[0]:+.1f}, {c.ci[1]:+.1f}]", fmt_p(c.p_holm),
                     "yes" if c.same_sign_in_every_seed else "no", per_seed, "**pass**" if v.passed else "FAIL"])
    return _table(["control", "kind", "effect [95% CI]", "Holm p", "same sign every seed",
                   "per training seed: effect [95% CI] Holm p", "verdict"], rows)


def pair_contrasts(arms: list[ArmRuns], metric: str = "rougeL") -> list[Contrast]:
    """Every pair of students, the later arm minus the earlier (so every method minus SFT, which trains
    first), Holm-adjusted together."""
    students = _students(arms)
    scores = {a.label: arm_scores(a, metric=metric) for a in students}
    return holm_adjust([contrast(b.label, scores[b.label], a.label, scores[a.label])
                        for a, b in combinations(students, 2)])


def mde_markdown(contrasts: list[Contrast]) -> list[str]:
    rows = []
    for c in contrasts:
        design = f"{c.n} × {len(c.seeds)}"
        rows.append([f"{c.a} − {c.b}", f"{c.effect:+.1f}", design, _num(math.sqrt(c.var_example)),
                     _num(math.sqrt(c.var_seed), 2), _num(math.sqrt(c.var_residual)), _num(c.standard_error(), 2),
                     f"**{_num(c.mde())}**", _num(c.mde(seeds=2 * len(c.seeds))), _num(c.mde(n=2 * c.n))])
    header = ["contrast", "effect", "examples × seeds", "σ_a (example)", "σ_u (seed)", "σ_e (residual)", "SE",
              "MDE", "MDE, 2× seeds", "MDE, 2× examples"]
    return _table(header, rows)


def ranking_markdown(arms: list[ArmRuns], metric: str = "rougeL") -> list[str]:
    """Every arm's score (mean over seeds; CI over examples of the seed-averaged scores; ± over seeds),
    its contrast with SFT (Holm across the rows) and its steps and compute."""
    from kdbench.metrics import bootstrap_ci, mean_std

    scores = {a.label: arm_scores(a, metric=metric) for a in arms}
    base = "sft" if "sft" in scores else None
    against = [a for a in arms if base and a.label != base]
    contrasts = {c.a: c for c in holm_adjust([contrast(a.label, scores[a.label], base, scores[base]) for a in against])}
    ordered = sorted(arms, key=lambda a: -_mean_over_seeds(scores[a.label]))
    rows = []
    for arm in ordered:
        per_seed = scores[arm.label]
        n = len(next(iter(per_seed.values())))
        averaged = [sum(v[i] for v in per_seed.values()) / len(per_seed) for i in range(n)]
        low, high = bootstrap_ci(averaged)
        mean, spread = mean_std([sum(v) / len(v) for v in per_seed.values()])
        c = contrasts.get(arm.label)
        versus = "baseline" if arm.label == base else (f"{c.effect:+.1f}, p {fmt_p(c.p_holm)}" if c else "-")
        cost = arm_cost(arm)
        rows.append([arm.label, _num(mean), f"[{_num(low)}, {_num(high)}]",
                     _num(spread) if len(per_seed) > 1 else "-", versus,
                     f"{_int(cost['selected'])} / {_int(cost['steps'])}" if cost else "-",
                     _int(cost.get("tokens")) if cost else "-", _int(cost.get("teacher_tokens")) if cost else "-",
                     _int(cost.get("generated")) if cost else "-", _num(cost.get("seconds")) if cost else "-"])
    return _table(["model", metric, "95% CI", "± seeds", "vs sft (Holm p)", "kept step / steps", "training tokens",
                   "teacher fwd tokens", "generated tokens", "wall s"], rows)


def readings_markdown(arms: list[ArmRuns], metrics: tuple[str, ...] = READINGS) -> list[str]:
    """Every arm's mean of each reading (over seeds) with its contrast with SFT (Holm across rows)."""
    scores = {m: {a.label: arm_scores(a, metric=m) for a in arms} for m in metrics}
    contrasts = {}
    for m in metrics:
        if "sft" in scores[m]:
            others = [a.label for a in arms if a.label != "sft"]
            found = holm_adjust([contrast(label, scores[m][label], "sft", scores[m]["sft"]) for label in others])
            contrasts.update({(m, c.a): c for c in found})
    rows = []
    for arm in sorted(arms, key=lambda a: -_mean_over_seeds(scores[metrics[0]][a.label])):
        row = [arm.label]
        for m in metrics:
            c = contrasts.get((m, arm.label))
            row.append(f"{_mean_over_seeds(scores[m][arm.label]):.1f}" +
                       (f" ({c.effect:+.1f}, p {fmt_p(c.p_holm)})" if c else ""))
        rows.append(row)
    return _table(["model"] + [f"{METRIC_TITLES[m]} (vs sft, Holm p)" for m in metrics], rows)


def _mean_over_seeds(per_seed: dict[int, list[float]]) -> float:
    return sum(sum(v) / len(v) for v in per_seed.values()) / len(per_seed)


def validity_markdown(out: Path, metrics: tuple[str, ...] = READINGS) -> str:
    """The validity section of one run: ranking with compute, every reading, the controls and the minimum
    detectable effects per reading."""
    arms = load_arms(out)
    students = _students(arms)
    seeds = max(len(a.seeds) for a in students) if students else 0
    lines = ["# Benchmark validity", "", "## Ranking (Rouge-L)", "", *ranking_markdown(arms, metrics[0]), "",
             "## Every reading", "", *readings_markdown(arms, metrics), ""]
    for metric in metrics:
        verdicts = control_verdicts(arms, metric)
        if verdicts:
            lines += [f"## Controls: {METRIC_TITLES[metric]}", "", *controls_markdown(verdicts), ""]
    lines += ["Positive controls must be significant (paired bootstrap over examples on the seed-averaged "
              f"differences, Holm across the controls of a reading, p < {ALPHA}) with the same sign in every "
              "training seed; negative controls must not be significantly better (KD against a meaningless "
              "teacher vs SFT) or must score below (DPO with swapped pairs vs DPO).", ""]
    for metric in metrics:
        lines += [f"## Minimum detectable effect: {METRIC_TITLES[metric]}", "",
                  *mde_markdown(pair_contrasts(arms, metric)), ""]
    lines += [f"MDE at {POWER:.0%} power, two-sided α = {ALPHA}, variance model examples × training seeds "
              f"(kdbench.validity): SE² = σ²_a/n + σ²_u/S + σ²_e/(nS), n examples, S = {seeds} training seeds. "
              f"Target for SFT vs KD: ≤ {TARGET_MDE:g} Rouge-L points."]
    return "\n".join(lines) + "\n"


def sign_agreement_markdown(first: Path, second: Path, metric: str = "rougeL",
                            labels: tuple[str, str] = ("world 1", "world 2")) -> str:
    """For every pair of arms present in both runs: the effect in each world, whether its sign agrees, and
    whether it is significant (Holm within each world) in both."""
    a_pairs = {(c.a, c.b): c for c in pair_contrasts(load_arms(first), metric)}
    b_pairs = {(c.a, c.b): c for c in pair_contrasts(load_arms(second), metric)}
    rows, agree, both = [], 0, 0
    for key, c1 in a_pairs.items():
        c2 = b_pairs.get(key) or _flipped(b_pairs.get((key[1], key[0])))
        if c2 is None:
            continue
        same = math.copysign(1, c1.effect) == math.copysign(1, c2.effect)
        significant = c1.significant() and c2.significant()
        agree += same
        both += significant and same
        rows.append([f"{key[0]} − {key[1]}", f"{c1.effect:+.1f} (p {fmt_p(c1.p_holm)})",
                     f"{c2.effect:+.1f} (p {fmt_p(c2.p_holm)})", "yes" if same else "**no**",
                     "yes" if significant and same else ("opposite signs" if significant else "no")])
    lines = _table(["contrast", *labels, "same sign", "significant in both"], rows)
    lines += ["", f"{agree} of {len(rows)} signs agree; {both} differences are significant in both worlds "
                  f"(Holm within each world, p < {ALPHA})."]
    return "\n".join(lines) + "\n"


def _flipped(c: Contrast | None) -> Contrast | None:
    if c is None:
        return None
    from dataclasses import replace

    return replace(c, a=c.b, b=c.a, effect=-c.effect, ci=(-c.ci[1], -c.ci[0]))


__all__ = ["load_arms", "arm_scores", "arm_cost", "compute_markdown", "control_verdicts", "pair_contrasts",
           "validity_markdown", "sign_agreement_markdown"]
