"""The cached building blocks of a recipe's stages, each keyed by its inputs in the artifact store.

* :func:`generation_stage` — a model's responses to prompts (the teacher's for SeqKD / dSFT / daDPO's y_t,
  a student's for y_s and ADPA's ŷ); a killed generation resumes from the partial file in the run
  directory; every stored response keeps the EOS its model emitted, or none when cut.
* :func:`model_stage` — a model another stage starts from (an SFT student or teacher, the dSFT model, a
  DPO-aligned teacher, a DCKD student): another recipe trained once per (models, data, settings), with the
  stage's own settings (:mod:`kdbench.train.stage_settings`).
* :func:`frozen_logps` — summed sequence log-probs of preference pairs under a frozen model.
* :func:`topk_cache_stage` — the teacher's offline top-k signal (:mod:`kdbench.teacher_cache`).
* :func:`prepared_teacher`, :func:`policy_start`, :func:`dsft_model` — teacher preparation and the policy's
  starting point, each a given checkpoint or a cached :func:`model_stage`.

A later run with the same inputs reuses every one of them ("reusing cached ... artifact" in the log).
Which of them a recipe runs is what it declares (``stages:``; :mod:`kdbench.train.stage_runner`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

from kdbench.config import build, to_dict
from kdbench.errors import ConfigError
from kdbench.parallel.ranks import current_ranks
from kdbench.store import RunDir, append_jsonl, atomic_write_json, atomic_write_text, hash_file, hash_obj, read_jsonl


def recipe_decoding(config, generation):
    """The decoding of a generating stage or sampling form: ``generation`` (a
    :class:`~kdbench.train.params.GenerationParams`) with the run's prompt limit and generation batch."""
    from kdbench.generate import DecodingConfig

    return DecodingConfig(greedy=bool(generation.greedy), temperature=float(generation.generation_temperature),
                          top_p=float(generation.top_p), top_k=int(generation.top_k),
                          max_new_tokens=int(generation.max_new_tokens), max_prompt_length=config.max_prompt_length,
                          batch_size=config.generation_batch_size)


def generation_stage(config, generation_seed: int, decoding, model, tokenizer, examples, run: RunDir, store, say, *,
                     model_name: str, kind: str = "teacher-generations"):
    """``model``'s response to every prompt of ``examples`` (artifact store, ``kind``; a killed generation
    resumes from the partial file in the run directory). Returns (examples, ends, facts): the examples with
    the generated text as ``output`` and, per example, its :class:`~kdbench.train.responses.ResponseEnd` (the
    EOS token the model stopped with, or none when cut at ``max_new_tokens``), recorded with every stored
    generation. ``model`` may be a :class:`~kdbench.models.LazyModel` (not loaded when the artifact exists)."""
    from kdbench.data import Example, format_prompt
    from kdbench.generate import HFBackend
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.responses import ResponseEnd

    prompts = [format_prompt(e.instruction, e.input, style=config.prompt_style, tokenizer=tokenizer) for e in examples]
    ids = [f"{i}" for i in range(len(examples))]
    inputs = {"teacher": model_fingerprint(model_name), "prompts": hash_obj(prompts),
              "decoding": dataclasses.asdict(decoding), "seed": int(generation_seed),
              "record": "text+finished+eos_token"}  # earlier records lacked the response ends: not reused
    partial = run.path / "stages" / f"generate-{store.key(kind, inputs)}.partial.jsonl"

    def record(generation) -> dict:
        end = ResponseEnd.of_ids(generation.eos_token_id, tokenizer)  # None: cut at the limit
        return {"id": generation.id, "text": generation.text, "new_tokens": generation.new_tokens, **end.record()}

    def build_generations(tmp: Path) -> dict:
        partial.parent.mkdir(parents=True, exist_ok=True)
        done = {r["id"]: r for r in read_jsonl(partial) if "eos_token" in r}
        todo = [i for i in range(len(examples)) if ids[i] not in done]
        if done and todo:
            say(f"resuming {kind}: {len(done)} of {len(examples)} done")

        def keep(batch):
            rows = [record(g) for g in batch]
            append_jsonl(partial, rows)
            done.update({r["id"]: r for r in rows})

        if todo:
            HFBackend(model, tokenizer).generate([prompts[i] for i in todo], [ids[i] for i in todo], decoding,
                                                 int(generation_seed), on_batch=keep)
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as handle:
            for i in ids:
                handle.write(json.dumps(done[i], ensure_ascii=False) + "\n")
        return {"n": len(ids), "generated_tokens": sum(int(done[i]["new_tokens"]) for i in ids),
                "unfinished": sum(not done[i]["finished"] for i in ids)}

    say(f"{kind.replace('-', ' ')} ({decoding.describe()}) for {len(examples)} prompts")
    ranks = current_ranks()
    if ranks.distributed:  # torchrun / accelerate launch: every rank generates a share (kdbench.parallel)
        artifact = _split_generation(ranks, store, kind, inputs, build_generations, partial, ids, prompts, model,
                                     tokenizer, decoding, int(generation_seed), record, say)
    else:
        artifact = store.get_or_build(kind, inputs, build_generations, log=say)
        partial.unlink(missing_ok=True)
    rows = {r["id"]: r for r in read_jsonl(artifact.path / "generations.jsonl")}
    generated = [Example(instruction=e.instruction, input=e.input, output=rows[ids[i]]["text"], id=e.id, extra=e.extra)
                 for i, e in enumerate(examples)]
    ends = [ResponseEnd.from_record(rows[i]) for i in ids]
    facts = {"reused": artifact.reused, "path": str(artifact.path), "build_seconds": artifact.meta.get("build_seconds", 0.0),
             "generated_tokens": int(artifact.meta.get("generated_tokens", 0)),  # the method's cost, even if reused
             "unfinished": sum(not end.finished for end in ends), "decoding": decoding.describe(),
             "processes": ranks.world_size}
    return generated, ends, facts


def _split_generation(ranks, store, kind: str, inputs: dict, build_generations, partial: Path, ids: list[str],
                      prompts: list[str], model, tokenizer, decoding, seed: int, record, say):
    """:func:`generation_stage`'s artifact under N processes: the prompts not yet generated are split across the
    ranks (:func:`kdbench.parallel.split_generation.generate_split`: per-rank partial files beside ``partial``,
    merged into it once; a killed run resumes per rank), then rank 0 stores the artifact from the merged file.
    Per-example seeding makes every response the one a single process generates. Every rank returns the
    artifact."""
    from kdbench.generate import HFBackend
    from kdbench.parallel.split_generation import generate_split

    existing = ranks.on_main(lambda: store.lookup(kind, inputs) is not None)
    if not existing:
        partial.parent.mkdir(parents=True, exist_ok=True)

        def generate(indices, write):
            if not indices:
                return
            backend_model = model.loaded() if hasattr(model, "loaded") else model
            backend_model.to(ranks.device())
            HFBackend(backend_model, tokenizer).generate([prompts[i] for i in indices], [ids[i] for i in indices],
                                                         decoding, seed, on_batch=lambda batch: write([record(g) for g in batch]))

        generate_split(ranks, partial, ids, generate,
                       on_resume=lambda done, total: say(f"resuming {kind}: {done} of {total} done"))
    artifact = ranks.on_main(lambda: store.get_or_build(kind, inputs, build_generations, log=say))
    if ranks.is_main:
        partial.unlink(missing_ok=True)
    ranks.barrier()
    return artifact


def given_model(value: str | None, name: str, what: str, tokenizer=None) -> Path | None:
    """Parameter ``name``'s ``value`` as a ready checkpoint folder (None when empty). A wrong path, or (with
    ``tokenizer``, the student's) a checkpoint with another tokenizer, is one sentence."""
    from kdbench.errors import ModelError

    if not value:
        return None
    path = Path(str(value))
    if not (path / "config.json").is_file():
        raise ConfigError(f"params.{name} {path} is not a model directory; give {what} folder (with config.json) "
                          "or leave it empty to train one.")
    if tokenizer is not None:
        from kdbench.models import load_tokenizer

        theirs = load_tokenizer(str(path))
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"params.{name} {path} uses another tokenizer than the student ({len(theirs)} vs "
                             f"{len(tokenizer)} tokens); give {what} fine-tuned from this student, or leave it "
                             "empty to train one.")
    return path


def model_stage(config, store, run: RunDir, say, *, train_recipe: Callable, kind: str, method: str, student: str,
                data: str, teacher: str | None = None, params: dict | None = None, settings: dict | None = None,
                description: str = "", teacher_stage: bool = False) -> tuple[Path, dict]:
    """A model another stage starts from: recipe ``method`` trained once per (models, data, settings) in the
    artifact store (``kind``) by ``train_recipe`` (:func:`kdbench.train.api.train`). Its run lives under this
    run's ``stages/`` folder while it trains, so a killed stage resumes from its checkpoints; later runs with
    the same inputs reuse it ("reusing cached ...").

    ``settings``: the stage's training settings (the recipe's ``<stage>_settings``, the papers' values,
    merged with the user's); the main run's learning rate, epochs, batch size, LM corpus and method terms
    never reach it (:mod:`kdbench.train.stage_settings`). ``teacher_stage``: a teacher-preparation stage,
    trained with one fixed seed so every training seed shares it."""
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.settings import TrainConfig
    from kdbench.train.stage_settings import STAGE_FORMAT, stage_key, stage_values

    values = stage_values(config, settings, kind=kind, teacher_stage=teacher_stage)
    values.update(method=method, student=student, teacher=teacher, data=data, params=dict(params or {}),
                  output_dir=str(run.path / "stages"), run_name=kind,
                  continue_from=None)  # a continued run's checkpoint belongs to its main stage, not this one
    values["select"] = "last"
    stage_config = build(TrainConfig, values, prefix=f"the {kind} stage's settings")

    def data_key(value):
        return hash_file(value) if value and Path(value).is_file() else value

    inputs = {"format": STAGE_FORMAT, "method": method, "student": model_fingerprint(student),
              "teacher": model_fingerprint(teacher) if teacher else None, "data": data_key(data),
              "valid_data": data_key(stage_config.valid_data), "settings": stage_key(to_dict(stage_config)),
              "params": stage_config.params}

    def build_stage(tmp: Path) -> dict:
        result = train_recipe(stage_config, log=say, progress=False)
        shutil.copytree(result.model_dir, tmp / "model")
        shutil.rmtree(run.path / "stages" / kind, ignore_errors=True)
        return {"optimizer_steps": result.cost.get("optimizer_steps"), "final_train_loss": result.final_train_loss,
                "lm_tokens": result.cost.get("lm_tokens", 0), "learning_rate": stage_config.learning_rate}

    length = f"{stage_config.max_steps} steps" if stage_config.max_steps > 0 else f"{stage_config.num_epochs:g} epochs"
    say(f"{kind} stage ({description or method}; learning rate {stage_config.learning_rate:g}, {length}, "
        f"batch {stage_config.batch_size} x {stage_config.grad_accum})")
    artifact = store.get_or_build(kind, inputs, build_stage, log=say)
    return artifact.path / "model", {"reused": artifact.reused, "path": str(artifact.path),
                                     "build_seconds": artifact.meta.get("build_seconds", 0.0),
                                     "settings": {k: getattr(stage_config, k) for k in
                                                  ("learning_rate", "num_epochs", "max_steps", "batch_size",
                                                   "grad_accum", "seed")}}


def chosen_as_examples(pairs, run: RunDir) -> str:
    """The pairs' (prompt, chosen) as an SFT file in the run's ``stages/`` folder (for an SFT student or
    teacher on a preference file's y_w); the same pairs give the same file, hence the same artifact key."""
    path = run.path / "stages" / "chosen.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"id": p.example.id, "instruction": p.example.instruction, "input": p.example.input,
                               "output": p.chosen}, ensure_ascii=False) + "\n" for p in pairs)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return str(path)


def prepared_teacher(config, teacher_init, store, run: RunDir, say, data: str, *,
                     train_recipe: Callable) -> tuple[str, dict]:
    """The teacher a recipe distils from (METHODS.md, "Teacher preparation"): ``--teacher`` as given
    (``teacher_init: given``, the default: it is already fine-tuned on the task) or, ``teacher_init: sft``,
    ``--teacher`` fine-tuned on ``data`` first — as MiniLLM, DistiLLM, AKL and DPKD prepared theirs — with
    ``teacher_sft_settings``, once per (teacher, data, settings): a cached ``sft-model`` stage with a fixed
    seed, shared by every method and training seed on that teacher and data. ``teacher_init``: a
    :class:`~kdbench.train.params.TeacherInitParams`."""
    if teacher_init.teacher_init != "sft":
        return config.teacher, {"given": config.teacher}
    path, facts = model_stage(config, store, run, say, train_recipe=train_recipe, kind="sft-model", method="sft",
                              student=config.teacher, data=data, settings=teacher_init.teacher_sft_settings,
                              teacher_stage=True, description="the teacher fine-tuned on the task, teacher_init: sft")
    return str(path), facts


def policy_start(config, start, store, run: RunDir, say, sft_data: str, *, train_recipe: Callable) -> tuple[str, dict]:
    """Where a DPKD / ADPA / DCKD student starts (``start``: a :class:`~kdbench.train.params.PolicyStartParams`):
    ``sft_model`` (a ready SFT checkpoint), the student's SFT checkpoint trained once on ``sft_data``
    (``init: sft``, cached) or ``--student`` as given (``init: student``)."""
    given = given_model(start.sft_model, "sft_model", "an SFT student checkpoint")
    if given is not None:
        say(f"using the given SFT student {given}")
        return str(given), {"given": str(given)}
    if start.init == "student":
        return config.student, {"given": config.student}
    path, facts = model_stage(config, store, run, say, train_recipe=train_recipe, kind="sft-model", method="sft",
                              student=config.student, data=sft_data, settings=start.sft_settings,
                              description="the student's SFT checkpoint")
    return str(path), facts


def dsft_model(config, dsft, generation, store, run: RunDir, say, *, train_recipe: Callable) -> tuple[Path, dict]:
    """The dSFT checkpoint (``dsft``: a :class:`~kdbench.train.params.DSFTParams`): ``dsft_model`` if given, else
    the ``dsft`` recipe (the teacher's generations with this recipe's decoding, ``generation``) as a cached
    :func:`model_stage`."""
    given = given_model(dsft.dsft_model, "dsft_model", "a dSFT checkpoint")
    if given is not None:
        say(f"using the given dSFT model {given}")
        return given, {"given": str(given)}
    generation_params = {k: getattr(generation, k) for k in ("greedy", "generation_temperature", "top_p", "top_k",
                                                             "max_new_tokens", "generation_seed")}
    return model_stage(config, store, run, say, train_recipe=train_recipe, kind="dsft-model", method="dsft",
                       student=config.student, teacher=config.teacher, data=config.data, params=generation_params,
                       settings=dsft.dsft_settings, description="the dsft recipe on the teacher's outputs")


def frozen_logps(store, label: str, model_name: str, model_loader: Callable, tokenizer, pairs, config,
                 say) -> tuple[dict, dict]:
    """Summed log-probs of every chosen and rejected response of ``pairs`` under the frozen model
    ``model_name``, through the artifact store (its own tokenizer and prompt template; the log-softmax over its
    tokenizer's vocabulary rows, as the policy's). Returns ({"chosen": [P], "rejected": [P]}, facts)."""
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.pairs import frozen_sequence_logps, tokenize_pairs

    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)
    rows = len(tokenizer)
    inputs = {"model": model_fingerprint(model_name), "sequences": hash_obj(tokenized), "logit_rows": rows}

    def build_logps(tmp: Path) -> dict:
        logps = frozen_sequence_logps(model_loader(), tokenized, tokenizer.pad_token_id, config.generation_batch_size,
                                      vocab_size=rows)
        atomic_write_json(tmp / "logps.json", logps)
        return {"pairs": len(pairs), "forward_tokens": sum(len(r[s][0]) for r in tokenized for s in ("chosen", "rejected"))}

    say(f"{label} sequence log-probs of {len(pairs)} pairs")
    artifact = store.get_or_build("sequence-logprobs", inputs, build_logps, log=say)
    logps = json.loads((artifact.path / "logps.json").read_text())
    return logps, {"reused": artifact.reused, "path": str(artifact.path),
                   "build_seconds": artifact.meta.get("build_seconds", 0.0),
                   "forward_tokens": int(artifact.meta.get("forward_tokens", 0))}


def topk_cache_stage(config, teacher, teacher_name: str, datasets: list, *, temperature: float, vocab_size: int,
                     pad_token_id: int, store, say) -> tuple[list, dict, dict]:
    """The teacher's offline top-k signal on each of ``datasets`` (None entries pass through): (caches, facts,
    cost facts)."""
    from kdbench.teacher_cache import build_topk_cache

    common = dict(teacher_name=teacher_name, k=config.teacher_topk, temperature=temperature, vocab_size=vocab_size,
                  store=store, batch_size=config.generation_batch_size, logprobs_dtype=config.teacher_cache_dtype,
                  pad_token_id=pad_token_id, teacher_dtype=config.teacher_dtype, log=say)
    caches, infos = [], []
    for dataset in datasets:
        if dataset is None:
            caches.append(None)
            continue
        cache, info = build_topk_cache(teacher, dataset, **common)
        caches.append(cache)
        infos.append(info)
    cost = {"teacher_cache_build_seconds": round(sum(i["build_seconds"] for i in infos), 3),
            "teacher_cache_reused": infos[0]["reused"],
            "teacher_cache_forward_tokens": sum(i["teacher_forward_tokens"] for i in infos),
            "teacher_cache_bytes": infos[0]["cache_bytes"], "teacher_cache_path": infos[0]["path"]}
    return caches, {"train": infos[0], "k": config.teacher_topk}, cost
