"""The schema of a ``reproductions/`` registry file: one seed paper's table as a declarative plan.

A file names the hub checkpoints and data (each with a pinned revision, or ``revision: null`` and a
``revision_note`` saying why none could be pinned: such a table dry-runs but refuses to run at full scale),
the teacher-student pairs of the table, the preparation stages, every method row (the recipe in
``trainers/``, the paper's hyper-parameters and the section they come from), the evaluation protocol, the
keys into ``kdbench/paper_results.csv``, the honest gaps, and the miniature (``--scale mini``) stand-in.
Every key listed here is read by :mod:`kdbench.reproduce`.
"""

from __future__ import annotations

from kdbench.schema import DESCRIPTION, NAME, Key, Schema, integer, mapping, number, text, text_list

_REVISION = Key((str, type(None)), "Pinned commit of the hub repository (full or short hash as the Hub shows it); "
                                   "null = not pinned (revision_note says why; full scale then refuses to run).",
                required=True)

MODEL = Schema({
    "hub": text("Hugging Face model repository id.", required=True),
    "revision": _REVISION,
    "revision_note": text("Where the revision comes from, or why none is pinned."),
    "params_b": number("Parameters in billions (compute estimates).", required=True),
    "paper_name": text("How paper_results.csv names this model (its teacher / student column).", required=True),
})

DATASET = Schema({
    "hub": text("Hugging Face dataset repository id.", required=True),
    "revision": _REVISION,
    "revision_note": text("Where the revision comes from, or why none is pinned."),
    "file": text("File of that repository holding the rows (JSONL with instruction / input / output, or pairs)."),
    "rows": integer("Rows used for training (compute estimates).", required=True),
    "prompt_tokens": integer("Mean prompt tokens per row (compute estimates).", required=True),
    "response_tokens": integer("Mean response tokens per row (compute estimates).", required=True),
    "licence_note": text("A licence the user must accept before downloading, if any."),
})

PAIR = Schema({
    "teacher": text("Key of models: the teacher checkpoint.", required=True),
    "student": text("Key of models: the student checkpoint (or the model a student_preparation prunes).",
                    required=True),
    "paper_teacher": text("paper_results.csv teacher column.", required=True),
    "paper_student": text("paper_results.csv student column.", required=True),
    "data": text("Key of datasets this pair trains on (default: the table's train_data)."),
    "benchmark_suffix": text("Suffix of the paper's benchmark names for this pair (e.g. @helpsteer2)."),
    "paper_table": text("paper_results.csv table column of this pair when it is not the file's table."),
    "student_keep": number("Derive the student by pruning the teacher to this fraction of its blocks "
                           "(kdbench.students; the paper's pruned students); student then names the teacher."),
})

PREPARATION = Schema({
    "name": text("Stage name (rows refer to it as their teacher or start).", required=True),
    "of": text("The pair's model it prepares.", required=True, choices=("teacher", "student")),
    "kind": text("sft: fine-tune with the sft recipe on data.", required=True, choices=("sft",)),
    "data": text("Key of datasets (default: the pair's / table's)."),
    "settings": mapping("Training settings of the stage (TrainConfig fields: learning_rate, num_epochs, ...)."),
    "source": text("Section of the paper the settings come from.", required=True),
    "gap": text("One line: how this stage differs from the paper's."),
})

ROW = Schema({
    "label": text("The row's name in the paper's table (paper_results.csv method column).", required=True),
    "method": text("Recipe in trainers/ that trains it; absent for evaluated-only rows (teacher, student)."),
    "evaluate": text("Evaluated-only rows: which model.", choices=("teacher", "student")),
    "start": text("student (the pair's student as prepared), a preparation stage's name, or another row's label."),
    "teacher": text("teacher (the pair's teacher as prepared) or a preparation stage's name."),
    "data": text("Key of datasets (default: the pair's / table's)."),
    "params": mapping("Recipe parameters (method terms: beta, alpha, ...), applied at every scale."),
    "settings": mapping("Training settings at full scale (TrainConfig fields: learning_rate, num_epochs, batch_size, "
                        "grad_accum, ...); the mini scale uses its own budget."),
    "source": text("Section of the paper the hyper-parameters come from.", required=True),
    "paper_student": text("paper_results.csv student column of this row: the pair's student (default) or its "
                          "teacher (teacher rows of DPKD / daDPO).", choices=("student", "teacher")),
    "gap": text("One line: how this row differs from the paper's."),
})

BENCHMARK = Schema({
    "benchmark": text("paper_results.csv benchmark name (the pair's benchmark_suffix is appended).", required=True),
    "metric": text("paper_results.csv metric (e.g. rougeL, rougeL_mean, score, win_rate, omega, average).",
                   required=True),
    "kind": text("reference: a tasks/ suite scored by kdbench evaluate; judge: a judges/ protocol; "
                 "lm_eval: a tasks/ harness suite.", required=True, choices=("reference", "judge", "lm_eval")),
    "suite": text("tasks/ suite (reference, lm_eval) or judges/ protocol (judge).", required=True),
    "examples": integer("Prompts or questions evaluated (compute estimates).", required=True),
    "judge_model": text("The paper's judge model (judge benchmarks)."),
    "scale": number("Multiply kdbench's value by this before comparing (e.g. 100 for a 0-1 metric)."),
    "prompts": text("Pairwise judge benchmarks: the datasets key of the held-out in-domain prompts (a file of "
                    "instruction / input rows); without it the benchmark is not run at full scale."),
    "reference_row": text("AlpacaEval benchmarks: the label of the row whose answers are the reference (e.g. the "
                          "paper's own student), instead of the protocol's reference outputs."),
})

EVAL = Schema({
    "benchmarks": Key((list,), "The table's columns.", required=True, items=BENCHMARK),
    "seeds": Key((list,), "Generation seeds (empty: greedy).", required=True, items=Key((int,), "seed")),
    "limit": integer("Evaluate only the first N examples of each reference suite at full scale (default: all)."),
    "train_seeds": Key((list,), "Training seeds at full scale (default [1]: the papers train once).",
                       items=Key((int,), "seed")),
    "decoding": mapping("DecodingConfig fields of the evaluation (temperature, top_p, top_k, max_new_tokens, "
                        "max_prompt_length, greedy).", required=True),
    "source": text("Section of the paper the protocol comes from.", required=True),
})

MINI = Schema({
    "corpus": mapping("kdbench.synthetic CorpusConfig fields of the stand-in world.", required=True),
    "teacher_steps": integer("Optimizer steps of the stand-in teacher.", required=True),
    "student_pretrain_steps": integer("Language-pretraining steps of the stand-in student.", required=True),
    "student_epochs": number("Passes over its data of every token-level row.", required=True),
    "preference_epochs": number("Passes over its data of every preference row.", required=True),
    "train_seeds": Key((list,), "Training seeds (the CI is over seeds x examples).", required=True,
                       items=Key((int,), "seed")),
    "max_new_tokens": integer("Generation limit of every stage and of evaluation.", required=True),
    "eval_limit": integer("Test examples evaluated.", required=True),
    "batch_size": integer("Micro-batch size.", required=True),
    "checkpoints": integer("Checkpoints per run."),
})

REPRODUCTION = Schema({
    "name": NAME,
    "description": DESCRIPTION,
    "paper": text("paper_results.csv paper column.", required=True),
    "table": text("paper_results.csv table column.", required=True),
    "source": text("Where the table is (seed file and section).", required=True),
    "models": Key((dict,), "Hub checkpoints by key.", required=True, values=MODEL),
    "datasets": Key((dict,), "Hub datasets by key.", required=True, values=DATASET),
    "train_data": text("Key of datasets every row trains on unless it says otherwise.", required=True),
    "pairs": Key((list,), "Teacher-student pairs of the table.", required=True, items=PAIR),
    "preparation": Key((list,), "Teacher and student preparation stages, run once per pair and shared by every row.",
                       items=PREPARATION),
    "rows": Key((list,), "The table's method rows, in the paper's order.", required=True, items=ROW),
    "eval": mapping("The evaluation protocol.", EVAL.keys, required=True),
    "gaps": text_list("One line per setting that cannot be reproduced exactly."),
    "mini": mapping("The --scale mini stand-in (the embedded synthetic world).", MINI.keys, required=True),
})
