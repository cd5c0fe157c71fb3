"""Inference backends for generation and evaluation, chosen by a setting (``backend``).

* ``transformers`` (default): :class:`kdbench.generate.HFBackend`, any causal LM on CPU or GPU, with
  sampling seeded per (seed, example) so every answer is reproducible and independent of batching.
* ``vllm`` (GPU, ``pip install 'kdbench[vllm]'``): :class:`VLLMBackend`, the same
  :class:`kdbench.generate.Backend` interface over ``vllm.LLM``. Each request carries its own
  sampling seed (vLLM's per-request ``SamplingParams.seed``) from the same (seed, example) hash, so its
  answers are reproducible too, but they are vLLM's samples, not the transformers backend's: a run
  directory records the backend, and a resumed evaluation refuses to mix the two. For lm-eval suites
  the same setting selects lm-eval's own ``vllm`` model type.

A missing vLLM is one sentence (exit 2), raised before any model is loaded or run directory written.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from kdbench.errors import ConfigError
from kdbench.generate import DecodingConfig, Generation, HFBackend, example_seed

BACKENDS = ("transformers", "vllm")


def check_backend(name: str) -> str:
    """``name`` if it is a known backend whose library is installed; otherwise one clear sentence."""
    if name not in BACKENDS:
        raise ConfigError(f"Unknown inference backend {name!r}; choose one of: {', '.join(BACKENDS)}.")
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("The vllm backend needs vLLM, which is not installed: run pip install 'kdbench[vllm]' "
                          "on a machine with a CUDA GPU, or use backend=transformers.")
    return name


def make_backend(name: str, model_path: str | None = None, *, model=None, tokenizer=None,
                 tensor_parallel_size: int = 1):
    """A generation backend: ``transformers`` wraps an already-loaded ``model`` + ``tokenizer``;
    ``vllm`` loads ``model_path`` itself (vLLM owns its GPU memory) with ``tokenizer`` for prompts."""
    check_backend(name)
    if name == "transformers":
        if model is None or tokenizer is None:
            raise ValueError("the transformers backend needs a loaded model and tokenizer")
        return HFBackend(model, tokenizer)
    if not model_path:
        raise ConfigError("The vllm backend loads the model itself: give a model directory or Hugging Face id "
                          "(--model), not an already-loaded model.")
    return VLLMBackend(model_path, tokenizer, tensor_parallel_size=tensor_parallel_size)


def sampling_params(decoding: DecodingConfig, seed: int | None, example_id: str, stop_token_ids: list[int],
                    max_tokens: int) -> dict:
    """vLLM ``SamplingParams`` keywords for one request: the paper settings of ``decoding`` and the
    request's own seed (greedy: temperature 0, no seed)."""
    if decoding.no_repeat_ngram_size:
        raise ConfigError("The vllm backend has no no_repeat_ngram_size; set decoding.no_repeat_ngram_size=0 "
                          "or use backend=transformers.")
    params = {"max_tokens": max_tokens, "stop_token_ids": list(stop_token_ids), "skip_special_tokens": True,
              "detokenize": False}
    if decoding.greedy:
        params["temperature"] = 0.0
    else:
        params.update(temperature=decoding.temperature, top_p=decoding.top_p,
                      top_k=decoding.top_k if decoding.top_k > 0 else -1, seed=example_seed(seed or 0, example_id))
    return params


class VLLMBackend:
    """Generation with vLLM (GPU); same interface and records as :class:`kdbench.generate.HFBackend`.

    Prompts are tokenized and cut from the left exactly as the transformers backend does
    (:meth:`HFBackend.encode`), then sent as token ids; responses are decoded with the same rule."""

    def __init__(self, model_path: str, tokenizer, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9):
        import vllm

        from kdbench.models import resolve_model_path

        path = resolve_model_path(model_path)
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization)
        self._vllm = vllm
        self.tokenizer = tokenizer
        # the prompt handling and decoding rules of the transformers backend, without its model
        self._text = HFBackend(_TokenizerRules(path), tokenizer)
        self.max_model_len = int(getattr(self.llm.llm_engine.model_config, "max_model_len", 0) or 0)

    def generate(self, prompts: list[str], ids: list[str], decoding: DecodingConfig, seed: int | None = None,
                 on_batch: Callable[[list[Generation]], None] | None = None,
                 progress: Callable[[int], None] | None = None, **_unused) -> list[Generation]:
        """Generate for every prompt, ``decoding.batch_size`` requests per ``LLM.generate`` call (vLLM
        batches inside a call; the calls are the unit that reaches ``on_batch`` and the disk)."""
        if len(prompts) != len(ids):
            raise ValueError("prompts and ids must have the same length")
        encoded = self._text.encode(prompts, decoding.max_prompt_length)
        results: list[Generation] = []
        for start in range(0, len(prompts), decoding.batch_size):
            chunk = range(start, min(start + decoding.batch_size, len(prompts)))
            requests, params = [], []
            for i in chunk:
                room = decoding.max_new_tokens if not self.max_model_len else max(
                    1, min(decoding.max_new_tokens, self.max_model_len - len(encoded[i][0])))
                requests.append({"prompt_token_ids": encoded[i][0]})
                params.append(self._vllm.SamplingParams(**sampling_params(decoding, seed, ids[i], self._text.eos_ids,
                                                                          room)))
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            batch = [self._generation(ids[i], encoded[i], output.outputs[0]) for i, output in zip(chunk, outputs)]
            results.extend(batch)
            if on_batch:
                on_batch(batch)
            if progress:
                progress(len(batch))
        return results

    def _generation(self, example_id: str, encoded: tuple[list[int], bool], completion) -> Generation:
        """One vLLM ``CompletionOutput`` as a kdbench :class:`Generation` (EOS excluded from the tokens)."""
        tokens = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        eos = None
        if finished:
            eos = completion.stop_reason if isinstance(completion.stop_reason, int) else (
                tokens[-1] if tokens and tokens[-1] in self._text.eos_ids else self._text.eos_ids[0])
            if tokens and tokens[-1] == eos:
                tokens = tokens[:-1]
        text = self._text.decode(tokens)
        return Generation(example_id, text, len(tokens), len(encoded[0]), encoded[1], finished, eos, tokens)


class _TokenizerRules:
    """What :class:`HFBackend` reads besides the model's forward: the checkpoint's generation config (its
    extra end-of-sequence ids, e.g. Qwen2.5's two). vLLM holds the model itself."""

    def __init__(self, path: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a checkpoint without generation_config.json
            self.generation_config = None

    def forward(self, input_ids=None):  # pragma: no cover - never called: vLLM generates
        raise RuntimeError("vLLM generates; this object only carries the tokenizer rules")
