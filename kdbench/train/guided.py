"""Teacher-guided pipelines on preference data: DCKD, ADPA and ADPA+ (adpa_dckd.md §3.2–3.3, METHODS.md).

``kdbench train dckd|adpa|adpa_plus --data PREFS.jsonl`` runs these stages, each an artifact of the store
(reused by any later run with the same inputs, "reusing cached ..." in the log) and recorded in the run's
``stages.json``:

1. ``teachers``: π_ref = ``--teacher`` as given (``ref_teacher: given``; it is already fine-tuned on the
   task) or fine-tuned on the chosen responses (``ref_teacher: sft``); π_dpo = π_ref after DPO
   (β = ``teacher_dpo_beta`` = 0.05, reference = π_ref) on the preference data, or ``params.dpo_teacher``.
2. ``student``: where training starts — ``--student`` (``init: student``), its SFT checkpoint on the
   chosen responses (``init: sft``, ADPA's default), ``params.sft_model``, or for ADPA+ the DCKD student
   (the ``dckd`` recipe trained as a stage from that same SFT student — adpa_dckd.md Alg. 2 — or
   ``params.dckd_model``). Every stage trains with its own ``*_settings`` (the paper's, §4.1 / App. F).
3. ``generate`` (ADPA): ŷ = the starting student's response to every training prompt, generated once
   (greedy by default) and cached.
4. ``train``: :class:`GuidedTrainer` — CE on y_w plus DCKD's α·FKL(π_dpo‖π_θ) on y_w and y_l, or ADPA's
   γ·advantage loss on ŷ; the teachers run in the same step, never wrapped or checkpointed; the policy
   trains without dropout unless ``disable_dropout: false``.

Teachers and student must share a vocabulary (token-level signals); a mismatch stops the run before any
file is written.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from kdbench.config import to_dict
from kdbench.errors import ConfigError
from kdbench.store import RunDir
from kdbench.train.objectives import GuidedBatch
from kdbench.train.pipeline import (Pair, PairCollator, PairDataset, PreferenceTrainer, _positive,
                                    chosen_as_examples, finish_pair_run, given_model, load_preference_pairs,
                                    model_stage, pair_run_setup, policy_start, tokenize_pairs)

# what ADPA+ hands its DCKD stage: a given SFT student (sft_model) is where that stage starts, as in dckd itself
_DCKD_PARAMS = ("alpha", "kl_reduction", "temperature", "teacher_topk", "ref_teacher", "teacher_dpo_beta",
                "teacher_sft_settings", "teacher_dpo_settings", "init", "sft_model", "sft_settings", "disable_dropout")


class GuidedTrainer(PreferenceTrainer):
    """:class:`PreferenceTrainer` whose loss is a token-level teacher-guided objective on the pair rows
    (chosen = y_w; other = y_l for DCKD, ŷ for ADPA), normalized by the optimizer step's token counts."""

    def __init__(self, *args, ref_teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_teacher = ref_teacher
        if ref_teacher is not None:
            ref_teacher.eval()
            ref_teacher.requires_grad_(False)
            ref_teacher.to(self.args.device)

    def _teacher_logits(self, teacher, input_ids, attention_mask, vocab: int):
        with torch.no_grad():
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :vocab]
        self.counters["teacher_forward_tokens"] += int(attention_mask.sum())
        return logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from kdbench.losses import SparseTeacher

        n = inputs["example_index"].numel()
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        vocab = self.params["vocab_size"]
        logits = outputs.logits[:, :-1, :vocab]
        targets = inputs["labels"][:, 1:]
        mask = (targets != -100).to(torch.float32)
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        top_k = self.params.get("teacher_topk")
        temperature = float(self.params.get("temperature", 1.0))
        if self.params["loss"] == "dckd":
            dpo = self._teacher_logits(self.teacher, ids, attention, vocab)
            if top_k:  # the paper's top-50 teacher: k+1 bins (METHODS.md, "Sparse teacher")
                dpo = SparseTeacher.from_logits(dpo, int(top_k), temperature=temperature)
                dpo_chosen, dpo_other = (dpo._replace(ids=dpo.ids[rows], logprobs=dpo.logprobs[rows],
                                                      rest_logprob=None if dpo.rest_logprob is None
                                                      else dpo.rest_logprob[rows])
                                         for rows in (slice(0, n), slice(n, None)))
            else:
                dpo_chosen, dpo_other = dpo[:n], dpo[n:]
            ref_other = None
        else:  # ADPA: both teachers on the ŷ rows only
            dpo_chosen = None
            dpo_other = self._teacher_logits(self.teacher, ids[n:], attention[n:], vocab)
            ref_other = self._teacher_logits(self.ref_teacher, ids[n:], attention[n:], vocab)
        totals = self._denominators(inputs, num_items_in_batch)
        batch = GuidedBatch(logits[:n], targets[:n], mask[:n], logits[n:], mask[n:], dpo_chosen, dpo_other, ref_other,
                            chosen_tokens=_positive(totals["chosen_tokens"], logits),
                            other_tokens=_positive(totals["rejected_tokens"], logits),
                            sequences=_positive(totals["pairs"], logits))
        parts = self.objective.fn(batch, self.params)
        loss = parts.pop("loss")
        self.check_finite(loss)
        if model.training:
            counts = {"ce": mask[:n].sum(), "fkl_chosen": mask[:n].sum(), "fkl_rejected": mask[n:].sum(),
                      "adpa": mask[n:].sum()}
            for name, value in parts.items():
                self._window[name] = self._window.get(name, 0.0) + float(value.detach())
                self._window[f"_tokens_{name}"] = self._window.get(f"_tokens_{name}", 0.0) + float(counts[name])
            self._window["_pairs"] = self._window.get("_pairs", 0.0) + n
            self.counters["tokens_processed"] += int(attention.sum())
            self.counters["response_tokens"] += int(mask.sum())
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def train_guided(config, entry, params: dict, *, log: Callable[[str], None] | None = None,
                 command: list[str] | None = None, progress: bool = True, callbacks: list | None = None):
    """Run a DCKD / ADPA / ADPA+ recipe end to end (module docstring); returns a ``TrainResult``."""
    from kdbench.models import check_same_vocabulary, lazy_model, load_model, load_tokenizer
    from kdbench.store import ArtifactStore
    from kdbench.train.api import (Stages, recipe_decoding, split_validation, generation_stage, finished_result,
                                   require_inputs)
    from kdbench.train.data_sources import resolve_data_path
    from kdbench.train.engine import Stopwatch, train_resuming
    from kdbench.train.objectives import get_objective

    say = log or (lambda message: None)
    clock = Stopwatch()
    require_inputs(config, True)
    if config.select != "last" or config.eval_steps:
        raise ConfigError(f"Method {config.method} has no validation metric yet (its loss needs the teachers on "
                          "held-out responses); use select=last and eval_steps=0.")
    plus = bool(entry.body.get("dckd_first"))
    store = ArtifactStore(config.cache_dir)
    data_path = resolve_data_path(config.data, store=store, log=say)
    pairs = load_preference_pairs(data_path)
    if not config.valid_data:  # the same split as the stages' own runs make: the same training prompts
        kept = {id(e) for e in split_validation([p.example for p in pairs], config.valid_fraction, config.seed)[0]}
        pairs = [p for p in pairs if id(p.example) in kept]
    tokenizer = load_tokenizer(config.student)
    teacher_tokenizer = load_tokenizer(config.teacher)
    params["vocab_size"] = check_same_vocabulary(load_model(config.teacher, trainable=False), teacher_tokenizer,
                                                 load_model(config.student, trainable=False), tokenizer)
    for name, what in (("dpo_teacher", "a DPO-aligned teacher"), ("sft_model", "an SFT student checkpoint"),
                       ("dckd_model", "a DCKD student checkpoint")):
        given_model(params, name, what, tokenizer)  # a wrong path or tokenizer: one sentence, nothing written

    run = RunDir.create(config.output_dir, config.run_name or f"{config.method}-seed{config.seed}", kind="train",
                        config={**to_dict(config), "params": params, "recipe": entry.name,
                                "recipe_file": entry.path.name, "objective": "guided"},
                        command=command or sys.argv)
    if (finished := finished_result(run, say)) is not None:
        return finished
    stages = Stages(run)
    chosen_file = chosen_as_examples(pairs, run)

    # Stage: teachers (π_ref, π_dpo)
    ref_dir, facts = config.teacher, {"ref": {"given": config.teacher}}
    if params.get("ref_teacher", "given") == "sft":
        path, facts["ref"] = model_stage(config, store, run, say, kind="sft-model", method="sft", student=config.teacher,
                                         data=chosen_file, settings=params.get("teacher_sft_settings"),
                                         teacher_stage=True, description="the SFT teacher pi_ref on the chosen responses")
        ref_dir = str(path)
    dpo_dir = given_model(params, "dpo_teacher", "a DPO-aligned teacher")
    if dpo_dir is None:
        dpo_dir, facts["dpo"] = model_stage(
            config, store, run, say, kind="dpo-teacher", method="dpo", student=ref_dir, data=config.data,
            params={"beta": float(params["teacher_dpo_beta"]), "reference": "student"},
            settings=params.get("teacher_dpo_settings"), teacher_stage=True,
            description="pi_dpo: DPO of pi_ref on the preference data")
    else:
        facts["dpo"] = {"given": str(dpo_dir)}
    stages.mark("teachers", facts)

    # Stage: the student's starting point
    if plus:
        start = given_model(params, "dckd_model", "a DCKD student checkpoint")
        if start is None:
            dckd_params = {k: params[k] for k in _DCKD_PARAMS if k in params}
            dckd_params.update(dpo_teacher=str(dpo_dir), teacher_topk=params.get("dckd_teacher_topk"))
            start, s_facts = model_stage(config, store, run, say, kind="dckd-model", method="dckd",
                                         student=config.student, teacher=config.teacher, data=config.data,
                                         params=dckd_params, settings=params.get("dckd_settings"),
                                         description="the DCKD student ADPA+ starts from")
        else:
            s_facts = {"given": str(start)}
        start = str(start)
    else:
        start, s_facts = policy_start(config, params, store, run, say, chosen_file)
    stages.mark("student", s_facts)

    # Stage: ŷ (ADPA): the starting student's responses, once
    if params["loss"] == "adpa":
        decoding = recipe_decoding(config, params, "teacher")
        outputs, ends, g_facts = generation_stage(config, params, decoding, lazy_model(start, trainable=False),
                                                  tokenizer, [p.example for p in pairs], run, store, say,
                                                  model_name=start, kind="student-generations")
        # ŷ as the student produced it: its text and the EOS it stopped with, none when cut at the limit
        train_pairs = [Pair(p.example, p.chosen, o.output, rejected_end=end) for p, o, end in zip(pairs, outputs, ends)]
        stages.mark("generate", g_facts)
        generated = g_facts["generated_tokens"]
    else:
        train_pairs, generated = pairs, 0

    # Stage: training
    tokenized = tokenize_pairs(train_pairs, tokenizer, style=config.prompt_style,
                               max_prompt_length=config.max_prompt_length, max_length=config.max_length)
    run.log(f"method={config.method} pairs={len(train_pairs)} loss={params['loss']} start={start} pi_ref={ref_dir} "
            f"pi_dpo={dpo_dir}")
    args, train_callbacks = pair_run_setup(config, run, callbacks, progress)
    trainer = GuidedTrainer(
        model=load_model(start), args=args, train_dataset=PairDataset(tokenized, {}),
        data_collator=PairCollator(tokenizer.pad_token_id), callbacks=train_callbacks,
        objective=get_objective("guided"), params=params, tokenizer=tokenizer,
        teacher=load_model(str(dpo_dir), trainable=False, dtype=config.teacher_dtype),
        ref_teacher=(load_model(ref_dir, trainable=False, dtype=config.teacher_dtype)
                     if params["loss"] == "adpa" else None))
    output, resumed = train_resuming(trainer, run, run.path / "checkpoints", say)
    counters = trainer.cost_counters()
    cost = {"teacher_forward_tokens": counters["teacher_forward_tokens"], "train_pairs": len(train_pairs),
            "generated_tokens": generated}
    return finish_pair_run(config, entry, params, run, trainer, tokenizer, output, resumed, clock, cost, stages, say)
