"""kdbench.harness end to end on a tiny random GPT-2 over local lm-eval tasks (offline).

Every number kdbench reports is checked against (a) lm_eval.simple_evaluate called directly and
(b) an independent computation in this file: the multiple-choice accuracy from the model's own
log-likelihoods of each choice, the exact-match rate from the model's own greedy generations.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from kdbench import harness  # noqa: E402
from kdbench.errors import ConfigError, DataError, KdbenchError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER_DIR = SHARED / "models" / "gpt2-tokenizer"

# Golden values for the 16-question task below with the tiny GPT-2 initialised under
# torch.manual_seed(0) (torch 2.13 CPU, transformers 5.23). Obtained once from
# independent_choice_predictions() (this file's own log-likelihood scoring, not lm-eval) and pasted
# here; if torch changes its initialisation RNG they must be regenerated the same way.
GOLDEN_MC_ACC = 0.375  # 6 of 16
GOLDEN_MC_ACC_NORM = 0.3125  # 5 of 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"shared GPT-2 tokenizer not found at {TOKENIZER_DIR}")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    return transformers.GPT2LMHeadModel(config).eval()


def mc_records(count: int, offset: int = 0) -> list[dict]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    records = []
    for i in range(offset, offset + count):
        choices = [f"{colours[(i + k) % 6]} {i + k}" for k in range(3)] + [f"the number {i * 7 % 13}"]
        records.append({"question": f"Which colour does item {i} of the generated world have?",
                        "choices": choices, "answer": (i * 3) % 4})
    return records


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    harness.local_multiple_choice_task("toy_mc", mc_records(16), folder)
    harness.local_multiple_choice_task("toy_mc_fewshot", mc_records(8, offset=40), folder,
                                       fewshot_records=mc_records(5, offset=80))
    return str(folder)


def choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) from the model's logits (lm-eval's split rule:
    encode context+continuation, the continuation is what follows the context's own tokens)."""
    context_ids = tokenizer(context)["input_ids"]
    whole_ids = tokenizer(context + continuation)["input_ids"]
    assert whole_ids[:len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[pos - 1, whole_ids[pos]] for pos in range(len(context_ids), len(whole_ids))))


def independent_choice_predictions(model, tokenizer, records) -> tuple[float, float]:
    """(acc, acc_norm): argmax of log-likelihood, and of log-likelihood per character of the choice."""
    hits = hits_norm = 0
    for record in records:
        context = f"Question: {record['question']}\nAnswer:"
        lls = [choice_logprob(model, tokenizer, context, " " + choice) for choice in record["choices"]]
        per_char = [ll / len(choice) for ll, choice in zip(lls, record["choices"])]
        hits += int(max(range(len(lls)), key=lls.__getitem__) == record["answer"])
        hits_norm += int(max(range(len(per_char)), key=per_char.__getitem__) == record["answer"])
    return hits / len(records), hits_norm / len(records)


def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int, stop: str = "\n") -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split(stop)[0]


def regex_first(pattern: str, text: str) -> str:
    """lm-eval's regex filter: first match (its group), stripped, or "[invalid]"."""
    found = re.findall(pattern, text)
    return found[0].strip() if found else "[invalid]"


def direct_simple_evaluate(model, tokenizer, task: str, num_fewshot: int, include_path: str, batch_size: int = 8,
                           limit: int | None = None):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, task_manager=manager,
                                   limit=limit, log_samples=False)["results"][task]


def suite(*entries: dict, name: str = "toy") -> dict:
    return {"name": name, "description": "test suite", "type": "lm_eval", "protocol": "TOY", "tasks": list(entries)}


def test_multiple_choice_matches_independent_loglikelihood_scoring(model, tokenizer, tasks_dir):
    result = harness.run_harness(model, tokenizer, suite=suite(
        {"task": "toy_mc", "num_fewshot": 0, "metric": "acc"}), include_path=tasks_dir)
    acc, acc_norm = independent_choice_predictions(model, tokenizer, mc_records(16))
    score = result.tasks["toy_mc"]
    assert score.value == pytest.approx(acc, abs=1e-12)
    assert result.raw["results"]["toy_mc"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)
    assert (acc, acc_norm) == (GOLDEN_MC_ACC, GOLDEN_MC_ACC_NORM)
    assert score.n == 16 and score.num_fewshot == 0
    # sample standard error of a mean of 0/1 outcomes: sqrt(p (1 - p) / (n - 1))
    assert score.stderr == pytest.approx((acc * (1 - acc) / 15) ** 0.5, rel=1e-9)
    assert result.averages == {"average": pytest.approx(acc)}
    assert result.label == f"TOY protocol via lm-eval {harness.lm_eval_version()}"


def test_each_task_keeps_its_own_shot_count_and_matches_simple_evaluate(model, tokenizer, tasks_dir):
    result = harness.run_harness(model, tokenizer, suite=suite(
        {"task": "toy_mc_fewshot", "num_fewshot": 3, "metric": "acc_norm"},
        {"task": "toy_mc", "num_fewshot": 1, "metric": "acc"}), include_path=tasks_dir, limit=6)
    assert result.raw["n-shot"] == {"toy_mc_fewshot": 3, "toy_mc": 1}
    for task, shots, metric in (("toy_mc_fewshot", 3, "acc_norm"), ("toy_mc", 1, "acc")):
        direct = direct_simple_evaluate(model, tokenizer, task, shots, tasks_dir, limit=6)
        score = result.tasks[task]
        assert score.value == direct[f"{metric},none"]
        assert score.stderr == direct[f"{metric}_stderr,none"]
        assert score.num_fewshot == shots
    # few-shot examples change the prompt, so the 1-shot numbers differ from the 0-shot golden ones
    assert result.averages["average"] == pytest.approx(
        (result.tasks["toy_mc_fewshot"].value + result.tasks["toy_mc"].value) / 2)


def test_generation_task_exact_match_with_named_filters(model, tokenizer, tmp_path):
    prompts = [f"Item {i} of the generated world is" for i in range(8)]
    completions = [greedy_completion(model, tokenizer, p, max_new_tokens=6) for p in prompts]
    # answers chosen so the scores are known: the raw completion for even items (filter "none"
    # would match those), the completion's first word for every third item
    records = [{"prompt": p, "answer": regex_first(r"(\S+)", c) if i % 3 == 0 else f"nothing {i}"}
               for i, (p, c) in enumerate(zip(prompts, completions))]
    include = harness.local_generation_task("toy_gen", records, tmp_path, max_gen_toks=6,
                                            filters={"first-word": r"(\S+)", "last-word": r"(\S+)\s*$"})
    result = harness.run_harness(model, tokenizer, batch_size=1, include_path=include, suite=suite(
        {"task": "toy_gen", "num_fewshot": 0, "metric": "exact_match", "filter": "first-word"}))
    expected_first = sum(regex_first(r"(\S+)", c) == r["answer"] for c, r in zip(completions, records)) / 8
    expected_last = sum(regex_first(r"(\S+)\s*$", c) == r["answer"] for c, r in zip(completions, records)) / 8
    assert expected_first >= 3 / 8 and expected_last != expected_first  # a wrong filter would show
    score = result.tasks["toy_gen"]
    assert score.filter == "first-word"
    assert score.value == pytest.approx(expected_first)
    assert result.raw["results"]["toy_gen"]["exact_match,last-word"] == pytest.approx(expected_last)
    direct = direct_simple_evaluate(model, tokenizer, "toy_gen", 0, include, batch_size=1)
    assert score.value == direct["exact_match,first-word"]


def test_missing_lm_eval_gives_install_hint(model, tokenizer, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(KdbenchError) as info:
        harness.run_harness(model, tokenizer, suite="oll")
    assert "Install the harness extra: pip install 'kdbench[harness]'" in str(info.value)


def test_model_and_tokenizer_errors(model, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        harness.run_harness(model, None, suite="oll")
    with pytest.raises(KdbenchError, match="Model directory not found"):
        harness.run_harness(tmp_path / "missing", suite="oll")


def test_local_task_writers_validate_records(tmp_path):
    with pytest.raises(DataError, match="record 1"):
        harness.local_multiple_choice_task("bad", [mc_records(1)[0], {"question": "q", "choices": ["a"], "answer": 0}],
                                           tmp_path)
    with pytest.raises(DataError, match="answer"):
        harness.local_multiple_choice_task("bad", [{"question": "q", "choices": ["a", "b"], "answer": 2}], tmp_path)
    with pytest.raises(ConfigError, match="Task name"):
        harness.local_multiple_choice_task("../escape", mc_records(2), tmp_path)
    with pytest.raises(DataError, match="prompt"):
        harness.local_generation_task("gen", [{"answer": "x"}], tmp_path)
