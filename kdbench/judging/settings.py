"""Settings of the judged protocols (typed, validated before any work), one dataclass per protocol.

:class:`JudgeSettings` holds what every protocol shares: how to reach and pace the judge, the judgment cache,
the run directory (``out``) and ``limit`` / ``dry_run``. :class:`MTBenchConfig`, :class:`AlpacaEvalConfig` and
:class:`PairwiseConfig` add each protocol's inputs. ``kdbench judge ...`` builds them from its options and
:func:`kdbench.judge` from keyword arguments (unknown names are rejected with the valid ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdbench.config import option
from kdbench.errors import ConfigError

ANSWER_PROTOCOLS = ("kdbench", "fastchat")
MT_BENCH_MODES = ("single", "pairwise")
ALPACA_EVAL_VERSIONS = ("1", "2")
OFFLINE_MODES = ("exact", "rouge")


@dataclass
class JudgeSettings:
    """How to reach the judge and where the run goes (shared by every protocol)."""

    judge_model: str | None = option(None, "Judge model name as the endpoint knows it (recorded in every result).")
    base_url: str | None = option(None, "OpenAI-compatible endpoint (default: $KDBENCH_JUDGE_BASE_URL / "
                                        "$OPENAI_BASE_URL / OpenAI).")
    concurrency: int = option(16, "Judge requests in flight at once.")
    rpm: float | None = option(None, "At most this many requests per minute (default: no limit).")
    max_retries: int = option(6, "Retries per call on 429 / 5xx / timeouts / connection errors / malformed replies.")
    timeout_s: float = option(120.0, "Timeout of one judge call, seconds.")
    backoff_s: float = option(1.0, "Initial backoff before a retry, seconds (doubles, with jitter).")
    cache_dir: str | None = option(None, "Folder of the judgment cache (default: <kdbench cache>/judgments).")
    price_in: float | None = option(None, "USD per million prompt tokens (for the cost estimate).")
    price_out: float | None = option(None, "USD per million completion tokens (for the cost estimate).")
    dry_run: bool = option(False, "Count the calls and tokens the run needs, and stop (nothing is written).")
    out: str | None = option(None, "The run directory to write (run.json, config.yaml, judgments.jsonl, "
                                   "metrics.jsonl, cost.json).")
    limit: int | None = option(None, "Only the first N items (quick checks).")

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be a positive number of items (got {self.limit}); leave it out for all.")
        if not self.dry_run and not self.out:
            raise ConfigError("Pass --out, the run directory to write the judgments and scores to.")

    def client_settings(self, judge_model: str):
        """The :class:`~kdbench.judging.client.ClientSettings` of this run (validated: one sentence per problem)."""
        from kdbench.judging.client import ClientSettings

        return ClientSettings(model=judge_model, base_url=self.base_url, concurrency=self.concurrency,
                              requests_per_minute=self.rpm, max_retries=self.max_retries, timeout_s=self.timeout_s,
                              backoff_initial_s=self.backoff_s, backoff_max_s=max(60.0, self.backoff_s),
                              price_input_per_mtok=self.price_in, price_output_per_mtok=self.price_out)


@dataclass
class MTBenchConfig(JudgeSettings):
    """MT-Bench: single-answer grading (or pairwise), answers from files / runs or generated with ``model``."""

    answers: list[str] = option(factory=list, help="FastChat model_answer JSONL, a folder of them, or a kdbench "
                                                   "run directory; several allowed.")
    model: str | None = option(None, "Generate answers first with this model (directory, Hub id or GGUF alias).")
    model_id: str | None = option(None, "Name of the generated answers' model (fastchat: also picks the template).")
    answer_protocol: str = option("kdbench", "How answers are generated: kdbench (the tokenizer's chat template) "
                                             "or fastchat (FastChat's conversation template and seeding).")
    chat_template: str | None = option(None, "fastchat protocol: a FastChat template name instead of the one "
                                             "--model-id picks, or 'tokenizer' for the model's chat template.")
    batch_size: int = option(8, "Questions generated together.")
    data_dir: str | None = option(None, "Folder with FastChat's question.jsonl, judge_prompts.jsonl, "
                                        "reference_answer/ (default: $KDBENCH_DATA/mt_bench, else download).")
    reference: str | None = option(None, "Reference answers for math/reasoning/coding: a reference set of "
                                         "judges/mt_bench.yaml (gpt-4, gpt-4-0125-preview) or a JSONL path.")
    mode: str = option("single", "single (1-10 grading) or pairwise (two models, both orders).")

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MT_BENCH_MODES:
            raise ConfigError(f"--mode must be single or pairwise, not {self.mode!r}.")
        if self.answer_protocol not in ANSWER_PROTOCOLS:
            raise ConfigError(f"--answer-protocol must be kdbench or fastchat, not {self.answer_protocol!r}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if self.chat_template not in (None, "tokenizer") and self.answer_protocol != "fastchat":
            raise ConfigError("--chat-template names a FastChat template, which only --answer-protocol fastchat uses; "
                              "the kdbench protocol always uses the tokenizer's chat template.")
        if not self.answers and not self.model:
            raise ConfigError("Pass --answers (FastChat answers or a kdbench run) or --model to generate them.")
        if self.mode == "pairwise" and len(self.answers) + bool(self.model) != 2:
            raise ConfigError("Pairwise MT-Bench compares exactly two models; pass two --answers (or one and --model).")


@dataclass
class AlpacaEvalConfig(JudgeSettings):
    """AlpacaEval 1.0 / 2.0 against the protocol's reference outputs (or any other)."""

    outputs: str = option("", "Model outputs: AlpacaEval model_outputs.json, JSONL, or a kdbench run directory.")
    version: str = option("2", "1 (alpaca_eval_gpt4 vs text_davinci_003) or 2 (weighted_alpaca_eval_gpt4_turbo "
                               "vs gpt4_1106_preview).")
    reference: str | None = option(None, "Reference outputs (default: $KDBENCH_DATA/alpaca_eval/results/"
                                         "<reference>/model_outputs.json); any outputs file or run works.")
    templates_dir: str | None = option(None, "alpaca_eval evaluators_configs folder (default: the installed "
                                             "package's).")
    suite: str | None = option(None, "Suite of a run directory's generations.")
    seed: str | None = option(None, "Seed of a run directory's generations.")
    instruction_difficulty: str | None = option(None, "alpaca_eval instruction_difficulty.csv (LC without the "
                                                      "package).")
    glm_weights: str | None = option(None, "alpaca_eval GLM weights CSV (with instruction_difficulty).")

    def __post_init__(self):
        super().__post_init__()
        self.version = str(self.version)
        if self.version not in ALPACA_EVAL_VERSIONS:
            raise ConfigError(f"--version must be 1 or 2, not {self.version!r}.")
        if not self.outputs:
            raise ConfigError("Pass --outputs: the model's outputs file or its kdbench run directory.")


@dataclass
class PairwiseConfig(JudgeSettings):
    """The in-domain win rate ω of a student against a teacher (or any two runs) on the same prompts."""

    student: str = option("", "Student answers: a kdbench run directory or an outputs file.")
    teacher: str = option("", "Teacher (or any other) answers on the same prompts.")
    suite: str | None = option(None, "Suite of the run directories' generations.")
    seed: str | None = option(None, "Seed of the run directories' generations.")
    single_order: bool = option(False, "Judge one order only (student as A).")
    offline: str | None = option(None, "The deterministic offline judge: exact or rouge (never an LLM judgment).")
    tie_margin: float | None = option(None, "Offline rouge judge: Rouge-L differences up to this are ties "
                                            "(default: judges/offline.yaml).")
    references: str | None = option(None, "JSONL of {id, references} for the offline judge.")
    data_dir: str | None = option(None, "Folder with FastChat's judge_prompts.jsonl.")
    labels: dict = option(factory=dict, help="Row names for the student and teacher (default: the runs' labels).")

    def __post_init__(self):
        super().__post_init__()
        if not self.student or not self.teacher:
            raise ConfigError("Pass both --student and --teacher (kdbench run directories or outputs files).")
        if self.offline is not None and self.offline not in OFFLINE_MODES:
            raise ConfigError(f"--offline must be exact or rouge, not {self.offline!r}.")
        if self.tie_margin is not None and not 0 <= self.tie_margin < 1:
            raise ConfigError(f"--tie-margin must be in [0, 1) (got {self.tie_margin:g}).")


@dataclass
class JudgeOutcome:
    """What a judge run produced (also written to its run directory)."""

    protocol: str
    run: object | None  # kdbench.store.RunDir; None for a dry run
    summary: dict = field(default_factory=dict)
    judgments: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    usage: dict | None = None
    message: str = ""  # the one-line result ``kdbench judge`` prints
    usage_line: str = ""


__all__ = ["JudgeSettings", "MTBenchConfig", "AlpacaEvalConfig", "PairwiseConfig", "JudgeOutcome"]
