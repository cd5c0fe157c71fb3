"""How a training response ends: with the end-of-sequence token it stopped with, or with none.

A generated response that stopped carries the EOS id the model actually emitted — a model may have
several (Qwen2.5-Instruct stops at 151645 ``<|im_end|>`` or 151643 ``<|endoftext|>``, Llama-3-Instruct
at 128009 or 128001) — and a response cut at ``max_new_tokens`` carries none, so it is never trained
or scored as if it had ended. Dataset (gold) responses end with the tokenizer's EOS. The rule is the
same online (:func:`kdbench.train.sampling.sample_responses`) and cached (the generation stage records
``finished`` and the emitted token with every generation), for the teacher's responses and the
student's, in every pipeline.

A cached response is stored as text (another model may score it with its own tokenizer); its end is
stored as the emitted token's *string*, which a scoring tokenizer maps back to an id: the same token of
its vocabulary when it has one (always, for the generating model's own tokenizer), else its own EOS.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResponseEnd:
    """The end of one response. ``finished=False``: cut at the generation limit, no EOS appended.
    ``eos_token``: the text of the EOS token the model emitted (e.g. ``"<|im_end|>"``); ``None`` with
    ``finished=True`` = the scoring tokenizer's ``eos_token_id`` (dataset responses)."""

    finished: bool = True
    eos_token: str | None = None

    @classmethod
    def of_ids(cls, eos_token_id: int | None, tokenizer) -> "ResponseEnd":
        """The end of a generated row: ``eos_token_id`` is the id the model stopped with (None: cut)."""
        if eos_token_id is None:
            return cls(finished=False)
        return cls(finished=True, eos_token=tokenizer.convert_ids_to_tokens(int(eos_token_id)))

    @classmethod
    def from_record(cls, record: dict) -> "ResponseEnd":
        """The end stored in a generation record (``finished``, ``eos_token``)."""
        return cls(finished=bool(record["finished"]), eos_token=record.get("eos_token"))

    def record(self) -> dict:
        return {"finished": self.finished, "eos_token": self.eos_token}

    def token_id(self, tokenizer) -> int | None:
        """The id appended after the response by ``tokenizer`` (None: nothing appended)."""
        if not self.finished:
            return None
        if self.eos_token is None:
            return tokenizer.eos_token_id
        found = tokenizer.convert_tokens_to_ids(self.eos_token)
        if isinstance(found, int) and tokenizer.convert_ids_to_tokens(found) == self.eos_token:
            return found
        return tokenizer.eos_token_id  # another vocabulary without that token: its own end marker


GOLD_END = ResponseEnd()


def tokenize_response(example, tokenizer, *, style: str, max_prompt_length: int, max_length: int,
                      response: str | None = None, end: ResponseEnd = GOLD_END):
    """:func:`kdbench.data.tokenize_example` with the response ended by ``end`` (the emitted EOS id in
    ``tokenizer``'s vocabulary, or nothing for a cut response)."""
    from kdbench.data import tokenize_example

    end_id = end.token_id(tokenizer)
    return tokenize_example(example, tokenizer, style=style, max_prompt_length=max_prompt_length,
                            max_length=max_length, response=response, append_eos=end_id is not None,
                            eos_token_id=end_id)
