"""MT-Bench answer generation through :class:`kdbench.generate.HFBackend` (the one generation path).

Two protocols, declared in ``judges/mt_bench_answers.yaml`` and documented side by side in docs/judging.md:

* ``kdbench``: the prompt is the tokenizer's chat template; sampling uses the file's explicit ``top_p`` /
  ``top_k``; question q draws from one ``torch.Generator`` seeded ``seed + q`` through both turns.
* ``fastchat``: FastChat 0.2.36's ``gen_model_answer.py``: the conversation template its adapters pick from
  ``model_id`` (:mod:`kdbench.judging.fastchat_templates`; ``chat_template="tokenizer"`` uses the model's own
  chat template instead, another template name forces that one), the prompt tokenized as ``tokenizer(prompt)``
  does, the model's own generation defaults (``generation_config``: top_p, top_k), ``torch.manual_seed(choice)``
  at the start of each question carried through both turns, the template's stop token ids and stop string,
  and FastChat's clean-up (special tokens removed, stripped).

Both use FastChat's per-category temperatures (greedy below ``greedy_below``) and 1,024-token limit, and
answer turn 2 after the model's own turn-1 answer. Questions are generated in batches (turn 1 of the batch,
then turn 2) and each finished question is appended (fsync) to ``generations/mt_bench/seed<k>.jsonl`` of the
run, so an interrupted run resumes where it stopped; ``settings.json`` beside it refuses a rerun with other
settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kdbench.errors import ConfigError, DataError
from kdbench.judging.fastchat_templates import (ConversationTemplate, answers_protocol, conversation_template,
                                                template_name)

PROTOCOLS = ("kdbench", "fastchat")
TOKENIZER_TEMPLATE = "tokenizer"


@dataclass
class AnswerPlan:
    """Everything that decides a model's MT-Bench answers (recorded in settings.json and every record)."""

    protocol: str
    model_id: str
    template: str  # a FastChat template name, or "tokenizer" (the model's chat template)
    seed: int
    max_new_tokens: int
    top_p: float
    top_k: int
    temperatures: dict
    default_temperature: float
    greedy_below: float
    add_special_tokens: bool
    chat_template_sha256: str | None = None
    notes: list = field(default_factory=list)

    def temperature(self, category: str | None) -> float:
        return float(self.temperatures.get(category, self.default_temperature))

    def generator_seed(self, question_id: int) -> int:
        """kdbench: seed + question id; fastchat: the choice index for every question."""
        return self.seed + int(question_id) if self.protocol == "kdbench" else self.seed

    def record(self) -> dict:
        return {key: value for key, value in vars(self).items() if key != "notes"}


def plan_answers(model, tokenizer, *, model_id: str, protocol: str = "kdbench", chat_template: str | None = None,
                 body: dict | None = None) -> AnswerPlan:
    """The :class:`AnswerPlan` of ``protocol`` for this model (see the module docstring)."""
    body = body or answers_protocol()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--answer-protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}.")
    settings = body["protocols"][protocol]
    common = dict(model_id=model_id, max_new_tokens=int(body["max_new_tokens"]), temperatures=dict(body["temperature"]),
                  default_temperature=float(body["default_temperature"]), greedy_below=float(body["greedy_below"]))
    if protocol == "kdbench":
        if chat_template not in (None, TOKENIZER_TEMPLATE):
            raise ConfigError("--chat-template names a FastChat template, which only --answer-protocol fastchat "
                              "uses; the kdbench protocol always uses the tokenizer's chat template.")
        return AnswerPlan("kdbench", template=TOKENIZER_TEMPLATE, seed=int(settings["seed"]),
                          top_p=float(settings["top_p"]), top_k=int(settings["top_k"]), add_special_tokens=False,
                          chat_template_sha256=_chat_template_sha(tokenizer), **common)
    name = chat_template or template_name(model_id, body["model_rules"])
    if name != TOKENIZER_TEMPLATE:
        conversation_template(name, body)  # a ConfigError now, before any work, for a template kdbench lacks
    defaults = body["model_defaults"]
    generation_config = getattr(model, "generation_config", None)

    def default(key):
        value = getattr(generation_config, key, None)
        return defaults[key] if value is None else value

    notes = []
    if float(default("repetition_penalty")) != 1.0:
        notes.append(f"the model's generation_config sets repetition_penalty={default('repetition_penalty')}, which "
                     "kdbench's generator does not apply")
    return AnswerPlan("fastchat", template=name, seed=int(settings["choice"]), top_p=float(default("top_p")),
                      top_k=int(default("top_k")), add_special_tokens=name != TOKENIZER_TEMPLATE,
                      chat_template_sha256=_chat_template_sha(tokenizer) if name == TOKENIZER_TEMPLATE else None,
                      notes=notes, **common)


def _chat_template_sha(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return hashlib.sha256(template.encode()).hexdigest() if template else None


def turn_prompt(plan: AnswerPlan, tokenizer, user_turns: Sequence[str], answers: Sequence[str]) -> str:
    """The prompt text for the answer to ``user_turns[-1]`` (earlier turns with the model's own answers)."""
    if plan.template == TOKENIZER_TEMPLATE:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("MT-Bench answers with the model's chat template need a tokenizer that has one; use an "
                            "instruction-tuned model, or --answer-protocol fastchat for FastChat's templates.")
        messages = []
        for index, turn in enumerate(user_turns):
            messages.append({"role": "user", "content": turn})
            if index < len(answers):
                messages.append({"role": "assistant", "content": answers[index]})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return conversation_template(plan.template).prompt(user_turns, answers)


def sampling(plan: AnswerPlan, category: str | None) -> dict:
    """The decoding of one question: greedy below ``greedy_below``, else sampling at the category's temperature
    with the plan's top_p / top_k (FastChat: ``do_sample = temperature >= 1e-4``)."""
    temperature = plan.temperature(category)
    if temperature < plan.greedy_below:
        return {"greedy": True, "temperature": temperature}
    return {"greedy": False, "temperature": temperature, "top_p": plan.top_p, "top_k": plan.top_k}


def settings_record(plan: AnswerPlan, model_name: str) -> dict:
    return {"model": model_name, **plan.record()}


def generate_answers(model, tokenizer, questions: Sequence[dict], plan: AnswerPlan, *, path: Path | None = None,
                     batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """FastChat ``model_answer`` records (``question_id``, ``answer_id``, ``model_id``, ``category``,
    ``choices: [{index, turns}]``, ``tstamp``, plus ``id``, ``prompts`` and ``sampling``) for every question.

    With ``path`` (a run's ``generations/mt_bench/seed<k>.jsonl``), questions already there are kept and each
    new batch is appended (fsync) once both turns are done."""
    import torch

    from kdbench.generate import DecodingConfig, HFBackend
    from kdbench.store import append_jsonl, read_jsonl

    done = {int(r["question_id"]): r for r in read_jsonl(path)} if path is not None else {}
    todo = [q for q in questions if int(q["question_id"]) not in done]
    backend = HFBackend(model, tokenizer)
    template: ConversationTemplate | None = (conversation_template(plan.template)
                                             if plan.template != TOKENIZER_TEMPLATE else None)
    stop_ids = list(template.stop_token_ids) if template else []
    specials = _special_token_texts(tokenizer)
    context = _context_length(model)
    finished = len(questions) - len(todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        generators = {str(q["question_id"]): torch.Generator().manual_seed(plan.generator_seed(q["question_id"]))
                      for q in chunk}
        answers: dict[str, list[str]] = {str(q["question_id"]): [] for q in chunk}
        prompts: dict[str, list[str]] = {str(q["question_id"]): [] for q in chunk}
        for turn in range(max(len(q["turns"]) for q in chunk)):
            asked = [q for q in chunk if turn < len(q["turns"])]
            # one generate call per decoding setting; each question keeps its own generator across turns
            groups: dict[str, list[dict]] = {}
            for question in asked:
                groups.setdefault(json.dumps(sampling(plan, question.get("category")), sort_keys=True), []).append(question)
            for key, members in groups.items():
                settings = json.loads(key)
                decoding = DecodingConfig(greedy=settings["greedy"], temperature=max(settings["temperature"], 1e-6),
                                          top_p=settings.get("top_p", 1.0), top_k=settings.get("top_k", 0),
                                          max_new_tokens=plan.max_new_tokens, max_prompt_length=context,
                                          batch_size=len(members))
                ids = [str(q["question_id"]) for q in members]
                texts = [turn_prompt(plan, tokenizer, q["turns"][:turn + 1], answers[i]) for q, i in zip(members, ids)]
                outputs = backend.generate(texts, ids, decoding, generators=generators, stop_token_ids=stop_ids,
                                           add_special_tokens=plan.add_special_tokens)
                for generation, text, qid in zip(outputs, texts, ids):
                    if template is not None:  # FastChat decodes with special tokens, then cleans up
                        raw = tokenizer.decode(generation.token_ids or [], spaces_between_special_tokens=False)
                        answer = template.clean(raw, specials)
                    else:
                        answer = generation.text
                    answers[qid].append(answer)
                    prompts[qid].append(text)
        records = [{"id": str(q["question_id"]), "question_id": q["question_id"],
                    "answer_id": f"{plan.model_id}-{q['question_id']}", "model_id": plan.model_id,
                    "category": q.get("category"), "choices": [{"index": 0, "turns": answers[str(q["question_id"])]}],
                    "prompts": prompts[str(q["question_id"])], "sampling": sampling(plan, q.get("category")),
                    "tstamp": time.time()} for q in chunk]
        if path is not None:
            append_jsonl(path, records)
        for record in records:
            done[int(record["question_id"])] = record
        finished += len(chunk)
        if progress:
            progress(finished, len(questions))
    return [done[int(q["question_id"])] for q in questions]


def _special_token_texts(tokenizer) -> list[str]:
    """The text of every special token in ``tokenizer.special_tokens_map`` (what FastChat removes)."""
    texts = []
    for value in getattr(tokenizer, "special_tokens_map", {}).values():
        texts += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return texts


def _context_length(model) -> int:
    """Prompt tokens kept: the model's context when it declares one (FastChat never truncates prompts)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20


__all__ = ["AnswerPlan", "PROTOCOLS", "generate_answers", "plan_answers", "sampling", "turn_prompt"]
