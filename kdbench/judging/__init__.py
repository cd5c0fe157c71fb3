"""Judged evaluation (PROTOCOLS.md §2–4): MT-Bench, AlpacaEval and the in-domain win rate ω.

* :mod:`kdbench.judging.client`: an asynchronous judge client for any OpenAI-compatible endpoint, with a
  concurrency limit, rate limiting, retries with exponential backoff and jitter, and a crash-safe on-disk
  cache of judgments (never pay twice for one).
* :mod:`kdbench.judging.api`: judging as a library (:func:`kdbench.judge`), each protocol's run written to a
  run directory (:mod:`kdbench.judging.runs`) with typed settings (:mod:`kdbench.judging.settings`).
* :mod:`kdbench.judging.mt_bench`: FastChat's llm_judge protocol (single-answer and pairwise grading,
  aggregation); :mod:`kdbench.judging.answers`: MT-Bench answer generation (kdbench or FastChat protocol,
  :mod:`kdbench.judging.fastchat_templates`).
* :mod:`kdbench.judging.alpaca_eval`: AlpacaEval 1.0 / 2.0 annotation and win rates (computed natively; the
  alpaca-eval package is never imported into this process).
* :mod:`kdbench.judging.pairwise`: the in-domain win rate ω of two runs (daDPO), with an LLM or the
  deterministic offline judge of :mod:`kdbench.judging.offline`.

Nothing here imports torch or transformers at import time.
"""
