"""FastChat's conversation templates, rendered from ``judges/mt_bench_answers.yaml`` (no FastChat code inside).

FastChat's ``gen_model_answer.py`` (0.2.36) builds each MT-Bench prompt with the conversation template its
model adapters pick from ``--model-id``: the first adapter whose rule matches the id's basename, then the
first that matches the whole id, and ``one_shot`` when none does. :func:`template_name` applies the same
rules (``model_rules`` in the judge file, in FastChat's order); :class:`ConversationTemplate` renders a
conversation in each separator style the file's templates use. The tests compare both with FastChat's own
``conversation.py`` (fschat 0.2.36, a dev dependency used as the oracle).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Sequence

from kdbench.errors import ConfigError


@dataclass(frozen=True)
class ConversationTemplate:
    """One FastChat conversation template (fields as in ``judges/mt_bench_answers.yaml``)."""

    name: str
    style: str
    roles: tuple[str, str]
    sep: str
    system: str = ""
    system_template: str = "{system_message}"
    sep2: str | None = None
    messages: tuple[tuple[str, str], ...] = ()  # few-shot messages before the conversation
    stop_str: str | None = None
    stop_token_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_body(cls, name: str, body: dict) -> "ConversationTemplate":
        return cls(name=name, style=body["style"], roles=tuple(body["roles"]), sep=body["sep"],
                   system=body.get("system", ""), system_template=body.get("system_template", "{system_message}"),
                   sep2=body.get("sep2"), messages=tuple(tuple(m) for m in body.get("messages") or ()),
                   stop_str=body.get("stop_str"), stop_token_ids=tuple(body.get("stop_token_ids") or ()))

    def prompt(self, user_turns: Sequence[str], answers: Sequence[str]) -> str:
        """The prompt for the model's answer to ``user_turns[-1]``, after the earlier turns and the model's own
        ``answers`` to them (``len(answers) == len(user_turns) - 1``)."""
        if len(answers) != len(user_turns) - 1:
            raise ValueError("give one answer per earlier user turn")
        conversation: list[tuple[str, str | None]] = list(self.messages)
        for index, turn in enumerate(user_turns):
            conversation.append((self.roles[0], turn))
            conversation.append((self.roles[1], answers[index] if index < len(answers) else None))
        return self.render(conversation)

    def render(self, conversation: Sequence[tuple[str, str | None]]) -> str:
        """A conversation of (role, text) messages as one string; a message that is None or empty is the
        open slot the model continues (FastChat tests ``if message:``, so an empty answer renders like one)."""
        system = self.system_template.format(system_message=self.system)
        seps = (self.sep, self.sep2)
        style = self.style
        if style in ("add_colon_single", "add_colon_two"):
            out = system + self.sep
            for i, (role, message) in enumerate(conversation):
                end = seps[i % 2] if style == "add_colon_two" else self.sep
                out += f"{role}: {message}{end}" if message else f"{role}:"
            return out
        if style == "add_new_line_single":
            out = system + self.sep if system else ""
            for role, message in conversation:
                out += f"{role}\n{message}{self.sep}" if message else f"{role}\n"
            return out
        if style == "chatml":
            out = system + self.sep + "\n" if system else ""
            for role, message in conversation:
                out += f"{role}\n{message}{self.sep}\n" if message else f"{role}\n"
            return out
        if style == "llama2":
            # the system block only when there is a system message; the first user turn follows it directly
            out = system if self.system else "[INST] "
            for i, (_, message) in enumerate(conversation):
                tag = self.roles[i % 2]
                if not message:
                    out += tag
                elif i == 0:
                    out += message + " "
                else:
                    out += f"{tag} {message}{seps[i % 2]}"
            return out
        if style == "dolly":
            out = system
            for i, (role, message) in enumerate(conversation):
                if message:
                    out += f"{role}:\n{message}{seps[i % 2]}" + ("\n\n" if i % 2 == 1 else "")
                else:
                    out += f"{role}:\n"
            return out
        if style == "falcon_chat":
            out = system + self.sep if self.system else ""
            for role, message in conversation:
                out += f"{role}: {message}{self.sep}" if message else f"{role}:"
            return out
        raise ConfigError(f"Conversation template {self.name!r} has the unknown style {style!r}.")

    def clean(self, text: str, special_tokens: Sequence[str]) -> str:
        """FastChat's post-processing of a decoded answer (decoded with its special tokens): cut at the stop
        string when it occurs after the first character, remove every special token's text, strip."""
        if self.stop_str:
            position = text.find(self.stop_str)
            if position > 0:
                text = text[:position]
        for token in special_tokens:
            if token:
                text = text.replace(token, "")
        return text.strip()


def _rule_matches(rule: dict, text: str) -> bool:
    """Whether one ``model_rules`` entry matches ``text`` (substrings lowercased unless case_sensitive)."""
    haystack = text if rule.get("case_sensitive") else text.lower()

    def norm(value: str) -> str:
        return value if rule.get("case_sensitive") else value.lower()

    checks = []
    if "exact" in rule:
        checks.append(text in rule["exact"])
    if "any" in rule:
        checks.append(any(norm(v) in haystack for v in rule["any"]))
    if "all" in rule:
        checks.append(all(norm(v) in haystack for v in rule["all"]))
    if "none" in rule:
        checks.append(not any(norm(v) in haystack for v in rule["none"]))
    if "regex" in rule:
        checks.append(re.search(rule["regex"], text, re.IGNORECASE) is not None)
    return bool(checks) and all(checks)


def template_name(model_id: str, rules: Sequence[dict]) -> str:
    """The template FastChat's ``get_conversation_template(model_id)`` picks: the first rule that matches the
    id's basename, then the first that matches the whole id, then ``one_shot``; a rule's ``variants`` refine
    its choice (matched on the whole id, or its basename with ``match_on: basename``)."""
    basename = os.path.basename(os.path.normpath(model_id))
    for text in (basename, model_id):
        for rule in rules:
            if _rule_matches(rule, text):
                for variant in rule.get("variants") or ():
                    target = basename if variant.get("match_on") == "basename" else model_id
                    if _rule_matches(variant, target):
                        return variant["template"]
                return rule["template"]
    return "one_shot"


def answers_protocol() -> dict:
    from kdbench import registry

    return registry.get("judges", "mt_bench_answers").body


def conversation_template(name: str, body: dict | None = None) -> ConversationTemplate:
    """The template ``name`` of the judge file, or a ConfigError naming the ones kdbench can render."""
    templates = (body or answers_protocol())["templates"]
    if name not in templates:
        raise ConfigError(f"FastChat's conversation template {name!r} is not one kdbench renders (judges/"
                          f"mt_bench_answers.yaml has: {', '.join(templates)}); pass --chat-template with one of "
                          "those, or --chat-template tokenizer for the model's own chat template.")
    return ConversationTemplate.from_body(name, templates[name])


__all__ = ["ConversationTemplate", "template_name", "conversation_template", "answers_protocol"]
