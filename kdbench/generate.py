"""Batched generation behind a backend interface.

:class:`HFBackend` decodes with a Hugging Face causal LM: prompts left-padded into batches, a KV
cache, greedy or sampling (temperature, top-p, top-k, ``no_repeat_ngram_size``). Sampling draws each
example's tokens from its own ``torch.Generator`` seeded by (seed, example id), so an example's
output does not depend on which batch it landed in, and a resumed run equals an uninterrupted one.

A vLLM backend fits the same :class:`Backend` interface; it is not shipped until it can be tested.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

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


class Backend(Protocol):
    def generate(self, prompts: list[str], ids: list[str], decoding: DecodingConfig, seed: int | None,
                 on_batch: Callable[[list[Generation]], None] | None = None) -> list[Generation]: ...


def example_seed(seed: int, example_id: str) -> int:
    """A 63-bit seed for one (seed, example) pair."""
    return int(hashlib.sha256(f"{seed}\x00{example_id}".encode()).hexdigest()[:15], 16)


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

    def _encode(self, prompts: list[str], max_prompt_length: int) -> list[tuple[list[int], bool]]:
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        add_bos = bos is not None and getattr(self.tokenizer, "add_bos_token", False)
        out = []
        for ids in encoded:
            ids = ([bos] + ids) if add_bos else list(ids)
            out.append((ids[-max_prompt_length:], len(ids) > max_prompt_length))
        return out

    def generate(self, prompts: list[str], ids: list[str], decoding: DecodingConfig, seed: int | None = None,
                 on_batch: Callable[[list[Generation]], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Generate for every prompt; ``on_batch`` receives each finished batch (for appending to disk)."""
        if len(prompts) != len(ids):
            raise ValueError("prompts and ids must have the same length")
        encoded = self._encode(prompts, decoding.max_prompt_length)
        # longest first: similar lengths share a batch (less padding); outputs do not depend on batching
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
        results: dict[int, Generation] = {}
        for start in range(0, len(order), decoding.batch_size):
            chunk = order[start:start + decoding.batch_size]
            batch = self._generate_batch([encoded[i][0] for i in chunk], [ids[i] for i in chunk], decoding, seed)
            done = []
            for position, index in enumerate(chunk):
                token_ids, finished = batch[position]
                text = self._decode(token_ids)
                generation = Generation(ids[index], text, len(token_ids), len(encoded[index][0]), encoded[index][1],
                                        finished)
                results[index] = generation
                done.append(generation)
            if on_batch:
                on_batch(done)
            if progress:
                progress(len(chunk))
        return [results[i] for i in range(len(prompts))]

    def _decode(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        eos_text = self.tokenizer.eos_token
        if eos_text and eos_text in text:  # cut at the end-of-sequence text
            text = text.split(eos_text, 1)[0]
        return text.strip()

    def _generate_batch(self, prompt_ids: list[list[int]], ids: list[str], decoding: DecodingConfig,
                        seed: int | None) -> list[tuple[list[int], bool]]:
        import torch
        from transformers import LogitsProcessorList
        from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        model = self.model
        device = next(model.parameters()).device
        batch_size = len(prompt_ids)
        longest = max(len(p) for p in prompt_ids)
        input_ids = torch.full((batch_size, longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, ids_ in enumerate(prompt_ids):
            input_ids[row, longest - len(ids_):] = torch.tensor(ids_, dtype=torch.long)
            attention[row, longest - len(ids_):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        processors = LogitsProcessorList()
        if decoding.no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size))
        if not decoding.greedy:
            if decoding.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(decoding.temperature))
            if decoding.top_k > 0:
                processors.append(TopKLogitsWarper(decoding.top_k))
            if decoding.top_p < 1.0:
                processors.append(TopPLogitsWarper(decoding.top_p))
            generators = [torch.Generator().manual_seed(example_seed(seed or 0, i)) for i in ids]

        eos = torch.tensor(self.eos_ids, device=device) if self.eos_ids else None
        sequences = input_ids
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        new_tokens: list[torch.Tensor] = []
        cache = None
        step_ids, step_positions = input_ids, positions
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for _ in range(decoding.max_new_tokens):
                    out = model(input_ids=step_ids, attention_mask=attention, position_ids=step_positions,
                                past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    logits = out.logits[:, -1, :].float()
                    logits = processors(sequences, logits) if len(processors) else logits
                    if decoding.greedy:
                        next_tokens = logits.argmax(dim=-1)
                    else:
                        probs = torch.softmax(logits, dim=-1).cpu()
                        next_tokens = torch.stack([
                            torch.multinomial(probs[row], 1, generator=generators[row])[0] for row in range(batch_size)
                        ]).to(device)
                    next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_id), next_tokens)
                    new_tokens.append(next_tokens)
                    if eos is not None:
                        finished |= torch.isin(next_tokens, eos)
                    sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
                    if bool(finished.all()):
                        break
                    attention = torch.cat([attention, torch.ones((batch_size, 1), dtype=attention.dtype,
                                                                 device=device)], dim=-1)
                    step_ids = next_tokens[:, None]
                    step_positions = step_positions[:, -1:] + 1
        finally:
            model.train(was_training)
        generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(batch_size)]
        results = []
        eos_set = set(self.eos_ids)
        for row in range(batch_size):
            tokens = []
            ended = False
            for token in generated[row]:
                if token in eos_set:
                    ended = True
                    break
                tokens.append(token)
            results.append((tokens, ended))
        return results


def iter_chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
