"""The schema of every registry file kind: tasks/, judges/ and trainers/ (the last declared with the training
package, :mod:`kdbench.train.recipe_schema`).

Each key a file may hold is listed here with its type and what it does, and every listed key is read by
the code that runs the file (a key nobody reads is a key a user edits for nothing). A task file's
``type`` and a judge file's ``kind`` choose its schema. ``kdbench list`` and the registry loader
validate every file against these (:mod:`kdbench.schema`).
"""

from __future__ import annotations

import dataclasses

from kdbench.schema import (DESCRIPTION, NAME, FileSchema, Key, Schema, flag, integer, mapping, number,
                            regex_check, text, text_list)
from kdbench.train.recipe_schema import TRAINERS


def _metric_names() -> list[str]:
    from kdbench.scoring import METRICS

    return list(METRICS)


def _decoding_keys() -> dict[str, Key]:
    from kdbench.generate import DecodingConfig

    kinds = {"bool": (bool,), "int": (int,), "float": (int, float)}
    return {f.name: Key(kinds.get(str(getattr(f.type, "__name__", f.type)), (object,)), f.metadata.get("help", ""))
            for f in dataclasses.fields(DecodingConfig)}


def _decoding_schema() -> Key:
    # built on first use so that the registry does not import torch-free generate.py at import time
    return Key((dict,), "Decoding defaults of this suite (DecodingConfig fields); the user's settings win.",
               check=_check_decoding)


def _check_decoding(value: dict) -> str | None:
    keys = _decoding_keys()
    for name, item in value.items():
        if name not in keys:
            return f"has the unknown key {name!r} (valid: {', '.join(keys)})"
        if not isinstance(item, keys[name].types) or (isinstance(item, bool) and bool not in keys[name].types):
            return f"has {name}: {item!r}, which must be {keys[name].types[-1].__name__}"
    return None


# --- tasks/ -------------------------------------------------------------------------------------

_COMMON_TASK = {"name": NAME, "description": DESCRIPTION}

REFERENCE_TASK = Schema({
    **_COMMON_TASK,
    "type": text("reference: generate, then score against the suite's references.", required=True),
    "source": mapping("Where the data comes from.", {
        "hf_dataset": text("Hugging Face dataset repository id."),
        "revision": Key((str, int), "Pinned revision (commit) of that repository."),
        "hf_file": text("File of that repository holding the evaluation split."),
        "embedded": flag("Built locally by kdbench (the synthetic world); nothing to download."),
    }),
    "local_files": text_list("Relative paths tried inside a data folder (--data DIR or $KDBENCH_DATA), first match wins."),
    "format": text("File format of the examples.", choices=("minillm_jsonl",)),
    "expected_size": integer("Examples in the published suite (a warning when the file differs)."),
    "limit": integer("Keep only the first N rows of the file (uinst: 10,000)."),
    "prompt": text("Prompt template: alpaca, compact or chat.", choices=("alpaca", "compact", "chat")),
    "decoding": _decoding_schema(),
    "metrics": text_list("Metrics scored per example (kdbench.scoring.METRICS).", choices=_metric_names),
    "buckets": mapping("Length buckets.", {
        "by": text("What the buckets measure.", choices=("first_reference_words",)),
        "edges": Key((list, str), "Right-closed cut points in words, or auto ((median, mean) of the suite)."),
    }),
    "category_field": Key((str, type(None)), "Field of a row holding its category (null: none)."),
    "categories": text_list("The suite's categories, in the order reports list them."),
})

_HARNESS_TASK_ENTRY = Schema({
    "task": text("lm-eval task, group or tag name.", required=True),
    "num_fewshot": integer("Shots for this task (lm-eval's global num_fewshot is never used).", required=True),
    "metric": Key((str, list), "Headline metric, or a list whose mean is the headline (IFEval).", required=True),
    "filter": text("lm-eval filter whose score is read (none, strict-match, flexible-extract ...)."),
    "average_uses": text("group (lm-eval's aggregate) or subtask_mean (unweighted over leaves).",
                         choices=("group", "subtask_mean")),
    "normalization": mapping("Open LLM Leaderboard v2 baselines.", {
        "random_baseline": number("Score of random guessing (0-1)."),
        "subtask_choices": mapping("Choices per subtask (baseline 1/choices).", values=Key((int,), "choices")),
    }),
})

HARNESS_TASK = Schema({
    **_COMMON_TASK,
    "type": text("lm_eval: scored by EleutherAI's lm-evaluation-harness.", required=True),
    "protocol": text("Name of the protocol shown next to every number (e.g. OLL-v1)."),
    "lm_eval_group": text("The lm-eval group the tasks come from (recorded with the results)."),
    "include_path": Key((str, list), "Folder(s) of local lm-eval task YAML, relative to this file."),
    "tasks": Key((list,), "The lm-eval tasks, each with its own shot count and metric.", required=True,
                 items=_HARNESS_TASK_ENTRY),
    "average": mapping("How the suite average is formed.", {"method": text("unweighted_mean.", choices=("unweighted_mean",))}),
})

TASKS = FileSchema("type", {"reference": REFERENCE_TASK, "lm_eval": HARNESS_TASK})

# --- judges/ ------------------------------------------------------------------------------------

_COMMON_JUDGE = {"name": NAME, "description": DESCRIPTION}
_JUDGE_PARAMS = Key((dict,), "Chat-completion parameters of every judge call (temperature, max_tokens, ...).",
                    required=True)
_TURN_PROMPTS = mapping("judge_prompts.jsonl names per turn.", {"turn_1": text("Turn 1 prompt.", required=True),
                                                                "turn_2": text("Turn 2 prompt.", required=True)})
_VERDICTS = Key((dict,), "Verdict marker -> A, B or tie, searched in this order; none found -> error.",
                required=True, values=text("A, B or tie.", choices=("A", "B", "tie")))

MT_BENCH = Schema({
    **_COMMON_JUDGE,
    "kind": text("mt_bench.", required=True),
    "source": mapping("The pinned FastChat commit the files come from.", {
        "repo": text("GitHub repository."), "commit": text("Commit.", required=True),
        "base_url": text("Download URL with {commit}.", required=True)}, required=True),
    "files": Key((dict,), "Protocol files: local name -> path under base_url and git blob id prefix.", required=True,
                 values=Schema({"path": text("Path under base_url.", required=True),
                                "blob": text("git blob id prefix (checked).", required=True),
                                "commit": text("Another commit for this file.")})),
    "reference_sets": Key((dict,), "Reference answer sets: name -> file.", required=True, values=text("file")),
    "default_reference": text("Reference set used without --reference.", required=True),
    "need_reference_categories": text_list("Categories graded against a reference answer.", required=True),
    "prompts": mapping("Judge prompt names.", {"single": _TURN_PROMPTS, "single_reference": _TURN_PROMPTS},
                       required=True),
    "judge_params": _JUDGE_PARAMS,
    "rating_patterns": Key((list,), "Regular expressions for the rating, tried in order; none -> score -1.",
                           required=True, items=text("regex"), check=regex_check),
})

MT_BENCH_PAIRWISE = Schema({
    **_COMMON_JUDGE,
    "kind": text("mt_bench_pairwise.", required=True),
    "uses": text("The judge file whose questions, prompts file and references are used.", required=True),
    "prompts": mapping("Judge prompt names.", {"pair": _TURN_PROMPTS, "pair_reference": _TURN_PROMPTS},
                       required=True),
    "judge_params": _JUDGE_PARAMS,
    "verdicts": _VERDICTS,
    "both_orders": flag("Judge each pair in both orders.", required=True),
})

PAIRWISE = Schema({
    **_COMMON_JUDGE,
    "kind": text("pairwise.", required=True),
    "uses": text("The judge file whose judge_prompts.jsonl holds the prompt.", required=True),
    "prompt": text("Judge prompt name.", required=True),
    "judge_params": _JUDGE_PARAMS,
    "verdicts": _VERDICTS,
    "both_orders": flag("Judge each prompt in both orders by default (--single-order: one).", required=True),
})

OFFLINE = Schema({
    **_COMMON_JUDGE,
    "kind": text("offline.", required=True),
    "modes": mapping("Offline judge modes.", {
        "exact": mapping("Exact match after normalization.", {"label": text("Shown next to every result.", required=True)},
                         required=True),
        "rouge": mapping("Rouge-L proxy.", {"label": text("Shown next to every result.", required=True),
                                            "tie_margin": number("Default tie margin (Rouge-L F units).", required=True)},
                         required=True),
    }, required=True),
})

ALPACA_EVAL = Schema({
    **_COMMON_JUDGE,
    "kind": text("alpaca_eval.", required=True),
    "annotator": text("alpaca_eval annotator config name.", required=True),
    "prompt_template": text("<config>/<file>.txt of alpaca_eval's evaluators_configs.", required=True),
    "prompt_template_blob": text("git blob id prefix of the template (a differing local copy is named in a warning)."),
    "default_judge_model": text("Judge model without --judge-model.", required=True),
    "judge_params": _JUDGE_PARAMS,
    "parser": text("How a verdict is read.", required=True, choices=("ranking", "logprob")),
    "parser_args": mapping("logprob parser tokens.", {"numerator_token": text("token"),
                                                      "denominator_tokens": text_list("tokens")}),
    "reference": text("Reference generator name (results/<reference>/model_outputs.json).", required=True),
    "reference_blob": text("git blob id prefix of the reference outputs file (a differing file is named in a warning)."),
    "randomize_order": mapping("Output order switch.", {"seed": integer("Seed of the switch.", required=True)},
                               required=True),
    "length_controlled": Key((bool, dict), "false, or the GLM's baseline and instruction count.", required=True,
                             keys=Schema({"baseline": text("Reference the GLM is fitted against.", required=True),
                                          "n_instructions": integer("Instructions the GLM needs.", required=True)})),
})

_TEMPLATE = Schema({
    "style": text("How turns are joined.", required=True,
                  choices=("add_colon_single", "add_colon_two", "add_new_line_single", "llama2", "chatml", "dolly",
                           "falcon_chat")),
    "system_template": text("Template of the system prompt ({system_message})."),
    "system": text("The system message."),
    "roles": text_list("User and assistant role names.", required=True),
    "messages": Key((list,), "Few-shot messages before the conversation: [role, text] pairs.", items=Key((list,), "pair")),
    "sep": text("Separator.", required=True),
    "sep2": text("Second separator."),
    "stop_str": text("Stop string (the answer is cut there)."),
    "stop_token_ids": Key((list,), "Stop token ids.", items=Key((int,), "id")),
})

_RULE_KEYS = {
    "any": text_list("Substrings, one of which must occur."),
    "all": text_list("Substrings that must all occur."),
    "none": text_list("Substrings that may not occur."),
    "exact": text_list("Ids matched exactly."),
    "regex": Key((str,), "Case-insensitive regular expression.", check=regex_check),
    "case_sensitive": flag("Match substrings without lowercasing."),
    "match_on": text("Match the basename or the whole id (variants only).", choices=("basename", "id")),
    "template": text("Template name.", required=True),
}
_RULE = Schema({**_RULE_KEYS, "variants": Key((list,), "The adapter's choice by name.", items=Schema(_RULE_KEYS))})

MT_BENCH_ANSWERS = Schema({
    **_COMMON_JUDGE,
    "kind": text("mt_bench_answers.", required=True),
    "max_new_tokens": integer("New-token limit per turn.", required=True),
    "temperature": Key((dict,), "Temperature per category.", required=True, values=number("temperature")),
    "default_temperature": number("Temperature of other categories.", required=True),
    "greedy_below": number("Temperatures below this decode greedily.", required=True),
    "protocols": mapping("Answer protocols.", {
        "kdbench": mapping("Chat template, explicit sampling.", {"top_p": number("top_p", required=True),
                                                                 "top_k": integer("top_k", required=True),
                                                                 "seed": integer("Base seed (+ question id).", required=True)},
                           required=True),
        "fastchat": mapping("FastChat's gen_model_answer.py.", {"choice": integer("torch.manual_seed(choice).", required=True)},
                            required=True)}, required=True),
    "model_defaults": mapping("transformers' values when generation_config sets none.", {
        "top_k": integer("top_k", required=True), "top_p": number("top_p", required=True),
        "repetition_penalty": number("repetition_penalty", required=True)}, required=True),
    "templates": Key((dict,), "FastChat conversation templates.", required=True, values=_TEMPLATE),
    "model_rules": Key((list,), "FastChat's model adapters, in order.", required=True, items=_RULE),
})

JUDGES = FileSchema("kind", {"mt_bench": MT_BENCH, "mt_bench_pairwise": MT_BENCH_PAIRWISE, "pairwise": PAIRWISE,
                             "offline": OFFLINE, "alpaca_eval": ALPACA_EVAL, "mt_bench_answers": MT_BENCH_ANSWERS})

# registry kind -> file schema (a trainers/ file's params depend on what it declares: kdbench.train.recipe_schema)
SCHEMAS: dict[str, FileSchema | Schema] = {"tasks": TASKS, "judges": JUDGES, "trainers": TRAINERS}

# reproductions/: one seed paper's table each (kdbench reproduce; the schema lives with its code)
from kdbench.reproduce.schema import REPRODUCTION  # noqa: E402

SCHEMAS["reproductions"] = REPRODUCTION
