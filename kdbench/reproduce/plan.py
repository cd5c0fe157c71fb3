"""The stage plan of a reproduction: every stage it runs, with its estimated compute and whether it is already
done, and the checks made before any work (pinned revisions, free disk).

Stages per pair (teacher -> student of the table): the hub downloads, the preparation stages (teacher / student
SFT, a pruned student), then per method row and training seed its training run (the recipe's own stages
counted with it: generations, SFT / dSFT / pi_dpo stages, frozen log-probs, top-k caches; a stage the artifact
store shares between rows is counted once per pair), then per row its evaluation on every benchmark. At
``--scale mini`` the stand-ins replace models and data (:mod:`kdbench.reproduce.mini`): one pair, the table's
first, and no download.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.errors import ConfigError
from kdbench.reproduce import costs
from kdbench.reproduce.costs import Compute
from kdbench.reproduce.layout import eval_dir, slug, train_dir
from kdbench.reproduce.table import Pair, Row, Table

# stages a recipe shares across rows through the artifact store (same inputs -> built once per pair)
SHARED_STAGES = ("sft_student", "dsft_model", "dpo_teacher", "dckd_student", "teacher_responses", "teacher_topk_cache")
BYTES_PER_PARAM_WEIGHTS = 2     # a bf16 checkpoint
BYTES_PER_PARAM_RESUMABLE = 16  # fp32 weights + AdamW moments of the one resumable checkpoint kept while training
LM_EVAL_TOKENS_PER_ITEM = 700   # OLL v1: few-shot context x choices, averaged over its six tasks (estimate)


@dataclass
class Stage:
    """One planned stage. ``status``: done, to run, not available (recipe missing in this version) or blocked."""

    pair: str
    kind: str          # download, prepare, train, evaluate
    name: str
    model: str
    compute: Compute = field(default_factory=Compute)
    status: str = "to run"
    note: str = ""
    disk_bytes: float = 0.0


@dataclass
class Plan:
    table: Table
    scale: str
    out: Path
    stages: list[Stage]
    unpinned: list[str]

    def total(self) -> Compute:
        total = Compute()
        for stage in self.stages:
            if stage.status == "to run":
                total = total.add(stage.compute)
        return total

    def disk_bytes(self) -> float:
        """Disk the stages still to run need (weights they write, plus the largest resumable checkpoint)."""
        todo = [s for s in self.stages if s.status == "to run"]
        return sum(s.disk_bytes for s in todo)


def _epochs(settings: dict, rows: int) -> float:
    if settings.get("max_steps", -1) and settings.get("max_steps", -1) > 0:
        batch = settings.get("batch_size", 8) * settings.get("grad_accum", 1)
        return settings["max_steps"] * batch / max(rows, 1)
    return float(settings.get("num_epochs", 1))


def _recipe_body(method: str) -> dict | None:
    from kdbench import registry

    return registry.get("trainers", method).body if method in registry.names("trainers") else None


def row_compute(table: Table, pair: Pair, row: Row, dataset: dict, shared: set) -> tuple[Compute, str]:
    """Training compute of ``row`` on ``pair`` (its recipe's declared stages included) and a note."""
    teacher_b = table.models[pair.teacher]["params_b"]
    student_b = table.models[pair.student]["params_b"] * (pair.student_keep or 1.0)
    rows, prompt, response = dataset["rows"], dataset["prompt_tokens"], dataset["response_tokens"]
    epochs = _epochs(row.settings, rows)
    sequence = prompt + response
    body = _recipe_body(row.method)
    if body is None:  # estimated as a token-level KD run until the recipe lands
        compute = costs.training(student_b, rows * epochs * sequence).add(costs.forward(teacher_b, rows * epochs * sequence))
        return compute, "estimated as token-level KD (the recipe is not in this version)"
    params = {**(body.get("params") or {}), **row.params}
    pairs_data = body.get("data") == "pairs" or params.get("pairs") == "preference_data"
    tokens = rows * epochs * sequence * (2 if pairs_data else 1)
    compute = costs.training(student_b, tokens)
    objective = body.get("objective")
    if objective not in ("sft",) and not (objective == "preference" and body.get("data") == "pairs"
                                          and "teacher" not in str(params.get("reference", ""))):
        compute = compute.add(costs.forward(teacher_b, tokens))  # teacher logits or teacher log-probs
    notes = []
    for stage in body.get("stages") or []:
        key = (pair.name, stage, str(params.get(f"{stage}_settings", "")))
        if stage in SHARED_STAGES and key in shared:
            notes.append(f"{stage} shared")
            continue
        shared.add(key)
        if stage == "teacher_responses":
            compute = compute.add(costs.generation(teacher_b, rows * response))
        elif stage in ("student_responses", "policy_responses"):
            online = body.get("sampling") in ("online_rejected", "on_policy_mix") and params.get("pairs", "online") == "online"
            compute = compute.add(costs.generation(student_b, rows * response * (epochs if online else 1)))
        elif stage == "frozen_logps":
            compute = compute.add(costs.forward(teacher_b, 2 * rows * sequence))
        elif stage == "teacher_topk_cache":
            compute = compute.add(costs.forward(teacher_b, rows * sequence))
        elif stage in ("sft_student", "dsft_model", "dckd_student"):
            settings = params.get({"sft_student": "sft_settings", "dsft_model": "dsft_settings",
                                   "dckd_student": "dckd_settings"}[stage]) or {}
            compute = compute.add(costs.training(student_b, rows * _epochs(settings, rows) * sequence))
        elif stage == "dpo_teacher":
            settings = params.get("teacher_dpo_settings") or {}
            compute = compute.add(costs.training(teacher_b, 2 * rows * _epochs(settings, rows) * sequence))
    return compute, ", ".join(notes)


def eval_compute(table: Table, params_b: float) -> Compute:
    """Evaluation compute of one model on every benchmark of the table."""
    decoding = table.eval["decoding"]
    seeds = max(1, len(table.eval["seeds"]))
    new_tokens = int(decoding.get("max_new_tokens", 256))
    total = Compute()
    for bench in table.benchmarks:
        if bench.kind == "lm_eval":
            total = total.add(costs.forward(params_b, bench.examples * LM_EVAL_TOKENS_PER_ITEM))
        else:
            turns = 2 if bench.suite == "mt_bench" else 1
            total = total.add(costs.generation(params_b, bench.examples * seeds * turns * new_tokens))
    return total


def _run_done(path: Path) -> bool:
    from kdbench.store import RunDir

    return (path / "run.json").is_file() and RunDir(path).complete


def build_plan(table: Table, scale: str, out: Path) -> Plan:
    """Every stage of ``table`` at ``scale`` with its compute and status (nothing is run)."""
    stages: list[Stage] = []
    unpinned = [f"model {key} ({spec['hub']})" for key, spec in table.models.items() if not spec.get("revision")]
    unpinned += [f"dataset {key} ({spec['hub']})" for key, spec in table.datasets.items() if not spec.get("revision")]
    pairs = table.pairs if scale == "full" else table.pairs[:1]
    train_seeds = (table.eval.get("train_seeds") or [1]) if scale == "full" else table.mini["train_seeds"]
    shared: set = set()
    prepared: dict = {}
    for pair in pairs:
        base = out if scale == "mini" else out / slug(pair.name)
        teacher_b = table.models[pair.teacher]["params_b"]
        student_b = table.models[pair.student]["params_b"] * (pair.student_keep or 1.0)
        dataset = table.datasets[pair.data]
        if scale == "full":
            for key in dict.fromkeys([pair.teacher, pair.student]):
                spec = table.models[key]
                if any(s.kind == "download" and s.name == key for s in stages):
                    continue
                stages.append(Stage(pair.name, "download", key, f"{spec['hub']}@{spec.get('revision') or 'NOT PINNED'}",
                                    status="to run" if spec.get("revision") else "blocked",
                                    note="" if spec.get("revision") else "no pinned revision",
                                    disk_bytes=spec["params_b"] * 1e9 * BYTES_PER_PARAM_WEIGHTS))
            used = [pair.data] + [p.get("data", pair.data) for p in table.preparation] + [r.data for r in table.rows if r.data]
            for key in dict.fromkeys(used):
                spec = table.datasets[key]
                if any(s.kind == "download" and s.name == key for s in stages):
                    continue
                stages.append(Stage(pair.name, "download", key, f"{spec['hub']}@{spec.get('revision') or 'NOT PINNED'} (data)",
                                    status="to run" if spec.get("revision") else "blocked",
                                    note="" if spec.get("revision") else "no pinned revision"))
            if pair.student_keep:
                stages.append(Stage(pair.name, "prepare", f"prune to {pair.student_keep:.0%} of blocks", pair.student,
                                    disk_bytes=student_b * 1e9 * BYTES_PER_PARAM_WEIGHTS,
                                    status="done" if _run_done(base / "prep" / "pruned-student") else "to run"))
            for prep in table.preparation:
                of_b = teacher_b if prep["of"] == "teacher" else student_b
                model = pair.teacher if prep["of"] == "teacher" else pair.student
                data_key = prep.get("data", pair.data)
                data = table.datasets[data_key]
                tokens = data["rows"] * _epochs(prep.get("settings") or {}, data["rows"]) * (
                    data["prompt_tokens"] + data["response_tokens"])
                first = prepared.setdefault((prep["name"], model, data_key, pair.student_keep if prep["of"] == "student"
                                             else None), pair.name)
                if first != pair.name:  # the same model, data and settings: the artifact store builds it once
                    stages.append(Stage(pair.name, "prepare", f"{prep['name']} ({prep['kind']})", model,
                                        status="shared", note=f"built for {first}"))
                    continue
                done = _run_done(base / "prep" / prep["name"])
                stages.append(Stage(pair.name, "prepare", f"{prep['name']} ({prep['kind']})", model,
                                    costs.training(of_b, tokens), "done" if done else "to run",
                                    disk_bytes=of_b * 1e9 * BYTES_PER_PARAM_WEIGHTS))
        for row in table.rows:
            if row.method is None:
                model_b = teacher_b if row.evaluate == "teacher" else student_b
                if row.evaluate == "teacher" and scale == "full":
                    first = prepared.setdefault(("evaluate", pair.teacher, pair.benchmark_suffix), pair.name)
                    if first != pair.name:
                        stages.append(Stage(pair.name, "evaluate", f"{row.label} (teacher as prepared)", pair.teacher,
                                            status="shared", note=f"evaluated for {first}"))
                        continue
                stages.append(Stage(pair.name, "evaluate", f"{row.label} ({row.evaluate} as prepared)",
                                    pair.teacher if row.evaluate == "teacher" else pair.student,
                                    eval_compute(table, model_b) if scale == "full" else Compute(),
                                    "done" if _run_done(eval_dir(base, row, None)) else "to run"))
                continue
            if not row.available:
                stages.append(Stage(pair.name, "train", f"{row.label} ({row.method})", pair.student, status="not available",
                                    note=f"method not available in this version (no trainers/{row.method}.yaml)"))
                continue
            compute, note = row_compute(table, pair, row, table.datasets[row.data or pair.data], shared)
            for seed in train_seeds:
                stages.append(Stage(pair.name, "train", f"{row.label} ({row.method}) seed {seed}", pair.student,
                                    compute if scale == "full" else Compute(),
                                    "done" if _run_done(train_dir(base, row, seed)) else "to run", note,
                                    disk_bytes=student_b * 1e9 * BYTES_PER_PARAM_WEIGHTS))
                stages.append(Stage(pair.name, "evaluate", f"{row.label} seed {seed}", pair.student,
                                    eval_compute(table, student_b) if scale == "full" else Compute(),
                                    "done" if _run_done(eval_dir(base, row, seed)) else "to run"))
    if scale == "full":  # the largest resumable checkpoint, once
        biggest = max([table.models[p.teacher]["params_b"] for p in pairs] + [0.0])
        stages.append(Stage("all", "disk", "resumable checkpoint headroom", "-",
                            disk_bytes=biggest * 1e9 * BYTES_PER_PARAM_RESUMABLE))
    return Plan(table, scale, out, stages, unpinned)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_before_work(plan: Plan, cache_dir: Path) -> None:
    """The checks of a run (not of a dry-run), all before any work: pinned revisions and training files in
    kdbench's format (full scale), then free disk."""
    if plan.scale == "full" and plan.unpinned:
        raise ConfigError(f"Reproduction {plan.table.name} has no pinned hub revision for {plan.unpinned[0]}; set its "
                          f"revision to a commit in {plan.table.path} (or a copy on KDBENCH_REGISTRY_PATH) before a "
                          "full-scale run.")
    if plan.scale == "full":
        from kdbench.reproduce.full import check_full_inputs

        check_full_inputs(plan.table)
    need = plan.disk_bytes() if plan.scale == "full" else 200e6  # mini: tiny models, generations, runs (measured ~60 MB)
    for where in dict.fromkeys([plan.out, cache_dir]):
        free = free_bytes(where)
        if free < need:
            raise ConfigError(f"The plan needs about {need / 1e9:.1f} GB of disk but {where} has {free / 1e9:.1f} GB "
                              "free; free some space or choose another --out / KDBENCH_CACHE.")


def render_plan(plan: Plan) -> str:
    """The plan as plain text: one line per stage, totals, blocked and unavailable rows, the conversion used."""
    figures = costs.measured()
    table = plan.table
    lines = [f"kdbench reproduce {table.name} --scale {plan.scale} --dry-run", f"{table.description}",
             f"source: {table.source}; published numbers: paper_results.csv ({table.paper}, table {table.table})",
             f"output: {plan.out}", ""]
    if plan.scale == "mini":
        pair = table.pairs[0]
        lines.append(f"mini: stand-ins on the embedded synthetic world for {pair.name} (teacher, student and data "
                     "replaced; every method row and benchmark kept)")
    header = f"  {'stage':<46} {'model':<44} {'tokens':>9} {'CPU-h':>9} {'GPU-h':>8}  status"
    current = None
    for stage in plan.stages:
        if stage.pair != current:
            current = stage.pair
            lines += ["", f"pair {stage.pair}" if current != "all" else "all pairs", header]
        c = stage.compute
        tokens = f"{c.tokens:.2e}" if c.tokens else "-"
        cpu = f"{c.cpu_hours(figures):.3g}" if c.tokens else "-"
        gpu = f"{c.gpu_hours():.3g}" if c.tokens else "-"
        status = stage.status + (f" ({stage.note})" if stage.note else "")
        disk = f"; {stage.disk_bytes / 1e9:.1f} GB" if stage.disk_bytes and plan.scale == "full" else ""
        lines.append(f"  {stage.kind + ' ' + stage.name:<46.46} {stage.model:<44.44} {tokens:>9} {cpu:>9} {gpu:>8}  "
                     f"{status}{disk}")
    total = plan.total()
    counts = {s: sum(x.status == s for x in plan.stages if x.kind != "disk") for s in ("to run", "done", "shared", "not available", "blocked")}
    lines += ["", f"total still to run: {total.tokens:.3g} tokens, {total.cpu_hours(figures):.3g} CPU-hours, "
                  f"{total.gpu_hours():.3g} GPU-hours on one {costs.DEVICE['name']}; stages: {counts['to run']} to run, "
                  f"{counts['done']} done (cached), {counts['shared']} shared with another pair, {counts['not available']} not available, {counts['blocked']} blocked"]
    if plan.scale == "full":
        lines.append(f"disk needed: about {plan.disk_bytes() / 1e9:.1f} GB (free at {plan.out}: "
                     f"{free_bytes(plan.out) / 1e9:.1f} GB)")
        for item in plan.unpinned:
            lines.append(f"NOT PINNED: {item} - a full run refuses until its revision is set")
    for stage in plan.stages:
        if stage.status == "not available" and stage.pair == plan.stages[0].pair:
            lines.append(f"not available in this version: row {stage.name} - the report lists it without a number")
    judged = [b for b in table.benchmarks if b.kind == "judge"]
    if judged:
        from kdbench.reproduce.judged import judge_requirement, judged_at_full_scale

        run_in_full = judged_at_full_scale(table)
        lines.append("judged benchmarks: " + "; ".join(
            f"{b.benchmark} by {b.judge_model} ({b.examples} prompts)"
            + ("" if plan.scale == "mini" or b in run_in_full else " - not run at full scale")
            for b in judged)
                     + ("" if plan.scale == "full" else " - mini: the offline Rouge-L proxy judge against the teacher"))
        if plan.scale == "full" and judge_requirement(table):
            lines.append(judge_requirement(table))
    lines += ["", "deviations from the paper:"] + [f"  - {gap}" for gap in table.gaps]
    lines += [f"  - row {row.label}: {row.gap}" for row in table.rows if row.gap]
    lines += [f"  - preparation {p['name']}: {p['gap']}" for p in table.preparation if p.get("gap")]
    lines += ["", costs.conversion_note(figures)]
    return "\n".join(lines) + "\n"


__all__ = ["Stage", "Plan", "build_plan", "check_before_work", "render_plan", "free_bytes"]
