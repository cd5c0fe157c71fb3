"""kdbench.generate.HFBackend on tiny random GPT-2 and Llama models with real tokenizers and real
Dolly prompts, checked against transformers' own generate() one prompt at a time and against a
step-by-step reference sampler written here (full forward, no cache, no batching)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdbench.generate import DecodingConfig, HFBackend, NGramBlocker, example_seed  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
DOLLY = SHARED / "data" / "dolly" / "minillm_processed" / "valid.jsonl"

if not (GPT2_TOKENIZER.is_dir() and SMOLLM2.is_dir() and DOLLY.is_file()):
    pytest.skip(f"shared tokenizers / Dolly data not found under {SHARED}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine, two intra-op threads make every small op wait for a busy core
    # (100x slower); the outputs do not depend on it.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gpt2():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=1024)
    return transformers.GPT2LMHeadModel(config).eval(), tokenizer


def _llama():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


MODELS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_tokenizer(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


@pytest.fixture(scope="module")
def prompts():
    from kdbench.suites import load_examples_file

    examples = load_examples_file(DOLLY, limit=7)
    return [e.prompt for e in examples], [e.id for e in examples]


def reference_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """transformers generate() on one unpadded prompt; new tokens up to (excluding) EOS."""
    ids = torch.tensor([prompt_ids])
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kwargs)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos)] if eos in new else new


def reference_sample(model, prompt_ids: list[int], n_tokens: int, generator, temperature=1.0, top_k=0) -> list[int]:
    """Step-by-step sampling with a full forward pass per step (no cache, no padding, no batch)."""
    tokens = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n_tokens):
            logits = model(torch.tensor([tokens])).logits[0, -1].float() / temperature
            if top_k:
                threshold = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=generator)[0]))
    return tokens[len(prompt_ids):]


def _tokens(backend, generation) -> list[int]:
    return backend.tokenizer(generation.text, add_special_tokens=False)["input_ids"]


def test_batched_greedy_equals_one_prompt_at_a_time_generate(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    texts, ids = prompts
    backend = HFBackend(model, tokenizer)
    decoding = DecodingConfig(greedy=True, max_new_tokens=12, batch_size=4)
    batched = backend.generate(texts, ids, decoding)
    single = backend.generate(texts, ids, DecodingConfig(greedy=True, max_new_tokens=12, batch_size=1))
    encoded = backend.encode(texts, decoding.max_prompt_length)
    assert len({len(ids_) for ids_, _ in encoded}) > 3  # prompts of different lengths: real left padding
    for generation, one, (prompt_ids, _) in zip(batched, single, encoded):
        expected = reference_greedy(model, tokenizer, prompt_ids, 12)
        assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert generation.new_tokens == len(expected)
        assert generation.prompt_tokens == len(prompt_ids)
        assert (generation.text, generation.new_tokens) == (one.text, one.new_tokens)


def test_sampling_matches_a_step_by_step_reference_sampler(gpt2, prompts):
    model, tokenizer = gpt2
    texts, ids = prompts
    backend = HFBackend(model, tokenizer)
    for settings in ({}, {"temperature": 0.7, "top_k": 20}):
        decoding = DecodingConfig(max_new_tokens=6, batch_size=3, **settings)
        generations = backend.generate(texts[:3], ids[:3], decoding, seed=20)
        for generation, text, example_id in zip(generations, texts[:3], ids[:3]):
            prompt_ids = backend.encode([text], 256)[0][0]
            generator = torch.Generator().manual_seed(example_seed(20, example_id))
            expected = reference_sample(model, prompt_ids, 6, generator, **settings)
            assert generation.new_tokens == 6
            assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_sampling_with_a_seed_does_not_depend_on_batch_size_or_order(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    texts, ids = prompts
    backend = HFBackend(model, tokenizer)
    runs = []
    for batch_size, order_seed in ((1, None), (3, 1), (7, 2), (32, 3)):
        order = list(range(len(texts)))
        if order_seed is not None:
            random.Random(order_seed).shuffle(order)
        decoding = DecodingConfig(max_new_tokens=10, batch_size=batch_size, top_p=0.95)
        out = backend.generate([texts[i] for i in order], [ids[i] for i in order], decoding, seed=10)
        runs.append({g.id: g.text for g in out})
    assert all(run == runs[0] for run in runs[1:])
    other_seed = backend.generate(texts, ids, DecodingConfig(max_new_tokens=10, top_p=0.95), seed=30)
    assert {g.id: g.text for g in other_seed} != runs[0]  # the seed matters


def test_no_repeat_ngram_size_blocks_repeats_like_transformers(gpt2, prompts):
    model, tokenizer = gpt2
    texts, ids = prompts
    backend = HFBackend(model, tokenizer)
    n = 2
    free = backend.generate(texts, ids, DecodingConfig(greedy=True, max_new_tokens=24, batch_size=4))
    blocked = backend.generate(texts, ids, DecodingConfig(greedy=True, max_new_tokens=24, batch_size=4,
                                                          no_repeat_ngram_size=n))
    encoded = backend.encode(texts, 256)

    def repeats(prompt_ids, new):
        sequence = prompt_ids + new
        grams = [tuple(sequence[i:i + n]) for i in range(len(sequence) - n + 1)]
        return sum(gram in grams[:i] for i, gram in enumerate(grams) if i + n > len(prompt_ids))

    # the random model repeats itself without the block (so the check below can fail) ...
    assert sum(repeats(p, reference_greedy(model, tokenizer, p, 24)) for p, _ in encoded) > 0
    assert [g.text for g in free] != [g.text for g in blocked]
    for generation, (prompt_ids, _) in zip(blocked, encoded):
        # ... and never with it; the tokens equal transformers' generate(no_repeat_ngram_size=2)
        expected = reference_greedy(model, tokenizer, prompt_ids, 24, no_repeat_ngram_size=n)
        assert repeats(prompt_ids, expected) == 0
        assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_ngram_blocker_bans_what_transformers_bans():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = random.Random(0)
    for n in (1, 2, 3, 6):
        for length in (0, 1, n - 1, n, 40):
            tokens = [rng.randrange(5) for _ in range(length)]
            blocker = NGramBlocker(n, tokens)
            if length == 0:
                assert blocker.banned() == []
                continue
            scores = NoRepeatNGramLogitsProcessor(n)(torch.tensor([tokens]), torch.zeros(1, 5))
            assert blocker.banned() == [t for t in range(5) if scores[0, t] == float("-inf")]


def test_prompt_truncation_keeps_the_end_and_is_recorded(gpt2, prompts):
    model, tokenizer = gpt2
    texts, ids = prompts
    backend = HFBackend(model, tokenizer)
    short = "Name a color."
    decoding = DecodingConfig(greedy=True, max_new_tokens=5, max_prompt_length=16)
    generations = backend.generate(texts[:3] + [short], ids[:3] + ["short"], decoding)
    for generation, text in zip(generations, texts[:3] + [short]):
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert generation.prompt_truncated == (len(full) > 16)
        assert generation.prompt_tokens == min(len(full), 16)
        expected = reference_greedy(model, tokenizer, full[-16:], 5)  # the last 16 tokens were kept
        assert generation.text == tokenizer.decode(expected).strip()
    assert [g.prompt_truncated for g in generations] == [True, True, True, False]


def test_eos_stops_each_row_and_the_others_continue(gpt2, prompts):
    model, tokenizer = gpt2
    texts, ids = prompts
    backend = HFBackend(model, tokenizer)
    decoding = DecodingConfig(greedy=True, max_new_tokens=16, batch_size=8)
    encoded = backend.encode(texts, 256)
    originals = [reference_greedy(model, tokenizer, p, 16) for p, _ in encoded]
    # end-of-sequence tokens (a list, as Llama-3-style configs have) that rows 0-2 produce at different steps
    stops = [originals[0][2], originals[1][5], originals[2][9]]

    def cut(tokens):
        return min((tokens.index(t) for t in stops if t in tokens), default=None)

    assert len({cut(tokens) for tokens in originals}) >= 3  # rows leave the batch at different steps
    previous = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stops
    try:
        generations = HFBackend(model, tokenizer).generate(texts, ids, decoding)
    finally:
        model.generation_config.eos_token_id = previous
    for generation, tokens in zip(generations, originals):
        end = cut(tokens)
        if end is not None:
            assert generation.finished and generation.new_tokens == end
            assert generation.text == tokenizer.decode(tokens[:end]).strip()
        else:
            assert not generation.finished and generation.new_tokens == 16
            assert generation.text == tokenizer.decode(tokens).strip()
    assert any(not g.finished for g in generations)


def test_decoding_cuts_at_the_eos_text_and_strips(gpt2):
    model, tokenizer = gpt2
    backend = HFBackend(model, tokenizer)
    ids = tokenizer(" The answer is 4. ", add_special_tokens=False)["input_ids"]
    assert backend._decode(ids) == "The answer is 4."


def test_bos_is_added_once(gpt2):
    _, tokenizer = gpt2
    backend = HFBackend(gpt2[0], tokenizer)
    tokenizer.add_bos_token = True
    try:
        plain, _ = backend.encode(["hello there"], 256)[0]
        already, _ = backend.encode([tokenizer.bos_token + "hello there"], 256)[0]
    finally:
        tokenizer.add_bos_token = False
    assert plain[0] == tokenizer.bos_token_id and plain[1] != tokenizer.bos_token_id
    assert already == plain


def test_decoding_config_rejects_bad_settings():
    from kdbench.errors import ConfigError

    for bad in ({"temperature": 0}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0}, {"batch_size": 0},
                {"no_repeat_ngram_size": -1}):
        with pytest.raises(ConfigError):
            DecodingConfig(**bad)
    assert "no_repeat_ngram=6" in DecodingConfig(no_repeat_ngram_size=6).describe()


def test_generation_stops_at_the_models_last_position():
    """A GPT-2 model cannot embed positions past n_positions: generation stops there instead of crashing."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdbench.generate import DecodingConfig, HFBackend

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=24, vocab_size=len(tokenizer)))
    model.config.eos_token_id = None
    backend = HFBackend(model, tokenizer)
    backend.eos_ids = []  # never stop early
    out = backend.generate(["one two three four five six"], ["a"], DecodingConfig(greedy=True, max_new_tokens=100))
    assert out[0].prompt_tokens + out[0].new_tokens == 24 and not out[0].finished  # up to the last position
