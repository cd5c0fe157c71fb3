"""Batched generation behind a backend interface.

:class:`HFBackend` decodes with a Hugging Face causal LM: prompts left-padded into batches, a KV
cache, greedy or sampling (temperature, top-p, top-k, ``no_repeat_ngram_size``). Sampling draws each
example's tokens from its own ``torch.Generator`` seeded by (seed, example id), so an example's
output does not depend on which batch it landed in, and a resumed run equals an uninterrupted one.

Work that does not change any output is skipped: the prompt pass computes logits for the last
position only (``logits_to_keep=1``: the full ``[batch, prompt, vocab]`` tensor would be 1.6 GB at
32 × 256 × 50k), rows that have ended are dropped from the batch and its KV cache, and n-gram
blocking keeps an incremental per-row table of the row's real tokens (padding never counts as
text, which also keeps a row's bans independent of its batch).

The vLLM backend (:mod:`kdbench.inference`) fits the same :class:`Backend` interface.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Protocol

from kdbench.config import option
from kdbench.errors import ConfigError


@dataclass
class DecodingConfig:
    greedy: bool = option(False, "Greedy decoding instead of sampling.")
    temperature: float = option(1.0, "Sampling temperature (papers: 1.0).")
    top_p: float = option(1.0, "Nucleus sampling mass (papers: 1.0, i.e. off).")
    top_k: int = option(0, "Top-k sampling (papers: 0, i.e. off).")
    max_new_tokens: int = option(256, "At most this many new tokens (papers: 256).")
    max_prompt_length: int = option(256, "Prompt tokens kept, cut from the left (papers: 256).")
    no_repeat_ngram_size: int = option(0, "Block repeated n-grams of this size (MiniLLM's scripts: 6; 0 = off).")
    batch_size: int = option(32, "Prompts per batch.")

    def __post_init__(self):
        if self.temperature <= 0 and not self.greedy:
            raise ConfigError("Setting temperature must be greater than 0 (use greedy for deterministic decoding).")
        if not 0 < self.top_p <= 1:
            raise ConfigError("Setting top_p must be in (0, 1].")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError("Setting no_repeat_ngram_size must be 0 (off) or a positive n-gram size.")
        if self.top_k < 0 or self.max_new_tokens < 1 or self.max_prompt_length < 1 or self.batch_size < 1:
            raise ConfigError("Settings top_k >= 0, max_new_tokens >= 1, max_prompt_length >= 1, batch_size >= 1 required.")

    def describe(self) -> str:
        if self.greedy:
            mode = "greedy"
        else:
            mode = f"sampling T={self.temperature:g}, top_p={self.top_p:g}, top_k={self.top_k}"
        extra = f", no_repeat_ngram={self.no_repeat_ngram_size}" if self.no_repeat_ngram_size else ""
        return f"{mode}, <= {self.max_new_tokens} new tokens{extra}"


@dataclass
class Generation:
    id: str
    text: str
    new_tokens: int
    prompt_tokens: int
    prompt_truncated: bool
    finished: bool  # ended with EOS (not cut by max_new_tokens)
    eos_token_id: int | None = None  # the end-of-sequence id the model emitted (None when cut)
    token_ids: list[int] | None = None  # the new tokens (EOS / stop token excluded), for callers that decode


class GeneratedIds(NamedTuple):
    """One row of :meth:`HFBackend.generate_ids`: the new token ids (EOS excluded) and the EOS id the
    model ended with — one of its several EOS ids (Qwen2.5-Instruct: 151645 or 151643) — or ``None``
    when the row was cut at ``max_new_tokens`` (or the model's last position)."""

    tokens: list[int]
    eos_token_id: int | None

    @property
    def finished(self) -> bool:
        return self.eos_token_id is not None

    def with_eos(self) -> list[int]:
        """The response as the model produced it: the new tokens plus the EOS it stopped with, if any."""
        return list(self.tokens) + ([self.eos_token_id] if self.eos_token_id is not None else [])


class Backend(Protocol):
    def generate(self, prompts: list[str], ids: list[str], decoding: DecodingConfig, seed: int | None,
                 on_batch: Callable[[list[Generation]], None] | None = None) -> list[Generation]: ...


def example_seed(seed: int, example_id: str) -> int:
    """A 63-bit seed for one (seed, example) pair."""
    return int(hashlib.sha256(f"{seed}\x00{example_id}".encode()).hexdigest()[:15], 16)


class NGramBlocker:
    """``no_repeat_ngram_size`` for one sequence, kept incrementally.

    Bans exactly what Hugging Face's ``NoRepeatNGramLogitsProcessor`` bans on the unpadded sequence:
    every token that followed the current last ``n - 1`` tokens earlier in the sequence (prompt
    included). A dict from each (n-1)-gram to its followers makes one step O(n) instead of O(length).
    """

    def __init__(self, n: int, tokens: list[int]):
        self.n = n
        self.tokens: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            key = tuple(self.tokens[len(self.tokens) - self.n:-1])
            self.followers.setdefault(key, set()).add(token)

    def banned(self) -> list[int]:
        """Tokens that would complete an n-gram already in the sequence."""
        if len(self.tokens) + 1 < self.n:
            return []
        key = tuple(self.tokens[len(self.tokens) - (self.n - 1):])
        return sorted(self.followers.get(key, ()))


class HFBackend:
    """Generation with a Hugging Face causal LM (see module docstring)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, (list, tuple)):
            ids.update(extra)
        self.eos_ids = sorted(ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        # tokens are drawn from the tokenizer's vocabulary only: the padded output rows a checkpoint may carry
        # beyond it (Qwen2.5) are no tokens, and training scores the same rows (kdbench.train.pairs)
        self.vocab_rows = len(tokenizer)
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            parameters = {}
        self._keep_last_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def encode(self, prompts: list[str], max_prompt_length: int,
               add_special_tokens: bool | None = None) -> list[tuple[list[int], bool]]:
        """(prompt token ids, truncated?) per prompt: BOS prepended when the tokenizer adds one (unless
        the text already starts with it, as chat templates' text does), then cut from the left to
        ``max_prompt_length`` tokens so that the end of the prompt (the response cue) is always kept.
        ``add_special_tokens=True`` instead tokenizes as ``tokenizer(prompts)`` does by default (whatever
        special tokens its post-processor adds; FastChat's gen_model_answer.py)."""
        if add_special_tokens:
            encoded = self.tokenizer(prompts)["input_ids"]
            return [(list(ids)[-max_prompt_length:], len(ids) > max_prompt_length) for ids in encoded]
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        add_bos = bos is not None and getattr(self.tokenizer, "add_bos_token", False)
        out = []
        for ids in encoded:
            ids = ([bos] + list(ids)) if add_bos and (not ids or ids[0] != bos) else list(ids)
            out.append((ids[-max_prompt_length:], len(ids) > max_prompt_length))
        return out

    _encode = encode  # old private name

    def generate(self, prompts: list[str], ids: list[str], decoding: DecodingConfig, seed: int | None = None,
                 on_batch: Callable[[list[Generation]], None] | None = None,
                 progress: Callable[[int], None] | None = None, *, generators: dict | None = None,
                 stop_token_ids: list[int] | None = None, add_special_tokens: bool | None = None) -> list[Generation]:
        """Generate for every prompt; ``on_batch`` receives each finished batch (for appending to disk).

        ``generators`` (example id -> ``torch.Generator``) replaces the per-(seed, id) generators when a caller
        owns the sampling stream (MT-Bench carries one question's generator from turn 1 into turn 2);
        ``stop_token_ids`` end a row like EOS does; ``add_special_tokens`` see :meth:`encode`."""
        if len(prompts) != len(ids):
            raise ValueError("prompts and ids must have the same length")
        encoded = self.encode(prompts, decoding.max_prompt_length, add_special_tokens)
        # longest first: similar lengths share a batch (less padding); outputs do not depend on batching
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
        results: dict[int, Generation] = {}
        for start in range(0, len(order), decoding.batch_size):
            chunk = order[start:start + decoding.batch_size]
            batch = self.generate_ids([encoded[i][0] for i in chunk], [ids[i] for i in chunk], decoding, seed,
                                      generators=[generators[ids[i]] for i in chunk] if generators else None,
                                      stop_token_ids=stop_token_ids)
            done = []
            for position, index in enumerate(chunk):
                row = batch[position]
                text = self._decode(row.tokens)
                generation = Generation(ids[index], text, len(row.tokens), len(encoded[index][0]), encoded[index][1],
                                        row.finished, row.eos_token_id, list(row.tokens))
                results[index] = generation
                done.append(generation)
            if on_batch:
                on_batch(done)
            if progress:
                progress(len(chunk))
        return [results[i] for i in range(len(prompts))]

    def decode(self, token_ids: list[int]) -> str:
        """A response's text: special tokens skipped, cut at the end-of-sequence text, stripped."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        eos_text = self.tokenizer.eos_token
        if eos_text and eos_text in text:  # cut at the end-of-sequence text
            text = text.split(eos_text, 1)[0]
        return text.strip()

    _decode = decode  # old private name

    def _warpers(self, decoding: DecodingConfig):
        """Temperature, top-k, top-p (Hugging Face's warpers, applied in generate()'s order)."""
        from transformers import LogitsProcessorList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList()
        if not decoding.greedy:
            if decoding.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(decoding.temperature))
            if decoding.top_k > 0:
                warpers.append(TopKLogitsWarper(decoding.top_k))
            if decoding.top_p < 1.0:
                warpers.append(TopPLogitsWarper(decoding.top_p))
        return warpers

    def generate_ids(self, prompt_ids: list[list[int]], ids: list[str], decoding: DecodingConfig,
                     seed: int | None, *, generators: list | None = None,
                     stop_token_ids: list[int] | None = None) -> list[GeneratedIds]:
        """Per prompt, the new tokens (EOS excluded) and the EOS id that ended them (None: cut). ``generators``
        (one per prompt) replace the per-example seeding; ``stop_token_ids`` end a row like an EOS id.

        ``prompt_ids``: B lists of token ids, left-padded here into ``[B, longest]``. Each step feeds
        the active rows' last token ``[A, 1]`` with the KV cache; rows that ended are dropped from
        the batch (and the cache) once a quarter of the active rows have ended.
        """
        import torch

        model = self.model
        device = next(model.parameters()).device
        n_rows = len(prompt_ids)
        longest = max(len(p) for p in prompt_ids)
        input_ids = torch.full((n_rows, longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n_rows, longest), dtype=torch.long)
        for row, row_ids in enumerate(prompt_ids):
            input_ids[row, longest - len(row_ids):] = torch.tensor(row_ids, dtype=torch.long)
            attention[row, longest - len(row_ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        warpers = self._warpers(decoding)
        if not decoding.greedy and generators is None:
            generators = [torch.Generator().manual_seed(example_seed(seed or 0, i)) for i in ids]
        blockers = ([NGramBlocker(decoding.no_repeat_ngram_size, p) for p in prompt_ids]
                    if decoding.no_repeat_ngram_size > 0 else None)
        eos_set = set(self.eos_ids) | set(stop_token_ids or ())

        # a model with learned absolute positions (GPT-2) cannot go past its last position: stop there
        # (the answer then counts as unfinished, like one cut by max_new_tokens)
        max_positions = model_max_positions(model)
        max_steps = decoding.max_new_tokens if max_positions is None else max(
            1, min(decoding.max_new_tokens, max_positions - longest))
        new_tokens: list[list[int]] = [[] for _ in range(n_rows)]
        ended = [False] * n_rows
        ended_with: list[int | None] = [None] * n_rows  # the EOS id each row emitted
        active = list(range(n_rows))  # batch row b holds prompt active[b]
        cache = None
        step_ids, step_positions = input_ids, positions
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for step in range(max_steps):
                    out = model(input_ids=step_ids, attention_mask=attention, position_ids=step_positions,
                                past_key_values=cache, use_cache=True, **self._keep_last_logits)
                    cache = out.past_key_values
                    logits = out.logits[:, -1, :self.vocab_rows].float()  # [A, V]
                    if blockers is not None:
                        for b, row in enumerate(active):
                            banned = blockers[row].banned()
                            if banned:
                                logits[b, banned] = float("-inf")
                    if decoding.greedy:
                        chosen = logits.argmax(dim=-1).tolist()
                    else:
                        if len(warpers):
                            logits = warpers(step_ids, logits)
                        probs = torch.softmax(logits, dim=-1).cpu()
                        # one draw per row from the row's own generator: independent of the batch
                        chosen = [int(torch.multinomial(probs[b], 1, generator=generators[row])[0])
                                  for b, row in enumerate(active)]
                    for row, token in zip(active, chosen):
                        if ended[row]:
                            continue
                        if token in eos_set:
                            ended[row] = True
                            ended_with[row] = token
                            continue
                        new_tokens[row].append(token)
                        if blockers is not None:
                            blockers[row].append(token)
                    n_ended = sum(ended[row] for row in active)
                    if n_ended == len(active) or step == max_steps - 1:
                        break
                    feed = torch.tensor([self.pad_id if ended[row] else token for row, token in zip(active, chosen)],
                                        dtype=torch.long, device=device)
                    if n_ended and n_ended >= max(1, len(active) // 4):
                        keep = [b for b, row in enumerate(active) if not ended[row]]
                        index = torch.tensor(keep, dtype=torch.long, device=device)
                        cache.batch_select_indices(index)
                        attention, feed, step_positions = attention[index], feed[index], step_positions[index]
                        active = [active[b] for b in keep]
                    attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
                    step_ids = feed[:, None]
                    step_positions = step_positions[:, -1:] + 1
        finally:
            model.train(was_training)
        return [GeneratedIds(new_tokens[row], ended_with[row]) for row in range(n_rows)]


def iter_chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def model_max_positions(model) -> int | None:
    """The number of positions a model with learned position embeddings supports (None: no hard limit)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in ("gpt2", "gpt_neo", "gptj", "opt", "bloom"):
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return None
