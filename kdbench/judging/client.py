"""An asynchronous, fault-tolerant, caching client for any OpenAI-compatible judge endpoint.

Judge calls cost money and fail in practice, so every call goes through :class:`JudgeClient`:

* **Concurrency and rate limits**: at most ``concurrency`` requests in flight (an ``asyncio.Semaphore``)
  and, optionally, at most ``requests_per_minute`` request starts (evenly spaced slots).
* **Retries**: 429, 5xx, 408/409, timeouts, connection errors and malformed responses (a body that is not
  JSON, a body cut off in transit, a reply without choices) are retried with exponential backoff and
  full jitter (``sleep ~ U(0, min(backoff_max_s, backoff_initial_s · 2^attempt))``; a server's
  ``Retry-After`` header, when present, is honoured instead, capped at ``backoff_max_s``). Other 4xx are not
  retried: 401/403/404 stop the run with a :class:`~kdbench.errors.KdbenchError` (nothing else can
  succeed), 400/422 fail that one judgment. One call that still fails is one failed judgment: every
  other call completes.
* **Cache**: every successful response is appended (flushed + fsynced, :func:`kdbench.store.append_jsonl`)
  to a JSONL file the moment it arrives, keyed by sha256 of (judge model, messages, parameters). A run
  killed at any point and restarted makes no repeated call for what it had received. Failed calls are not
  cached, so a rerun retries exactly those. The API key is never part of a key or a record.
* **Provenance and cost**: each reply records the model snapshot the endpoint reported
  (``response.model``) and its token usage; :class:`UsageStats` sums them per run with an estimated cost.

The key and base URL come from the environment (``KDBENCH_JUDGE_API_KEY`` / ``OPENAI_API_KEY``,
``KDBENCH_JUDGE_BASE_URL`` / ``OPENAI_BASE_URL``); the judge model is always an explicit setting. A URL is
recorded only with its user name and password removed (:func:`redact_url`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from kdbench.errors import ConfigError, KdbenchError
from kdbench.judging.cache import CACHE_SCHEMA, JudgmentCache, default_cache_path
from kdbench.judging.usage import PRICES_PER_MTOK, DryRunEstimate, UsageStats, estimate_tokens
from kdbench.store import hash_obj

API_KEY_VARIABLES = ("KDBENCH_JUDGE_API_KEY", "OPENAI_API_KEY")
BASE_URL_VARIABLES = ("KDBENCH_JUDGE_BASE_URL", "OPENAI_BASE_URL")


# ---------------------------------------------------------------------------------------------
# Requests, replies, settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeCall:
    """One chat-completion request: the messages and the sampling parameters (temperature, max_tokens,
    logprobs, top_logprobs ...). Two calls with equal messages and parameters to the same judge model are
    the same judgment and are made once."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    params: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, messages: Sequence[dict], **params: Any) -> "JudgeCall":
        return cls(tuple((m["role"], m["content"]) for m in messages), tuple(sorted(params.items())))

    def message_dicts(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def param_dict(self) -> dict:
        return dict(self.params)

    def cache_key(self, judge_model: str) -> str:
        """sha256 of (judge model, messages, parameters); never of the key or the endpoint."""
        return hash_obj({"judge_model": judge_model, "messages": self.message_dicts(), "params": self.param_dict()})

    def prompt_chars(self) -> int:
        return sum(len(content) for _, content in self.messages)


@dataclass
class JudgeReply:
    """The outcome of one :class:`JudgeCall`. ``ok`` False means the call failed after all retries
    (``error`` says why); a reply with ``ok`` True may still hold an unparseable verdict."""

    key: str
    ok: bool
    content: str | None = None
    top_logprobs: list[dict] | None = None  # first completion token: [{"token": str, "logprob": float}, ...]
    model_reported: str | None = None
    usage: dict = field(default_factory=dict)
    cached: bool = False
    attempts: int = 0
    error: str | None = None
    finish_reason: str | None = None


@dataclass
class ClientSettings:
    """How to reach and pace the judge. The API key is deliberately not a field (it is never recorded)."""

    model: str
    base_url: str | None = None
    concurrency: int = 16
    requests_per_minute: float | None = None
    max_retries: int = 6
    timeout_s: float = 120.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    price_input_per_mtok: float | None = None
    price_output_per_mtok: float | None = None

    def __post_init__(self):
        import math

        if not self.model:
            raise ConfigError("Name the judge model (for example --judge-model gpt-4o-2024-08-06).")
        checks = [
            (self.concurrency >= 1, f"--concurrency must be at least 1 (got {self.concurrency})."),
            (self.max_retries >= 0, f"--max-retries must be 0 or more (got {self.max_retries})."),
            (self.requests_per_minute is None or self.requests_per_minute > 0,
             f"--rpm must be a positive number of requests per minute, or left out for no limit (got "
             f"{self.requests_per_minute})."),
            (math.isfinite(self.timeout_s) and self.timeout_s > 0,
             f"--timeout-s must be a positive number of seconds for one judge call (got {self.timeout_s:g})."),
            (math.isfinite(self.backoff_initial_s) and self.backoff_initial_s >= 0,
             f"--backoff-s must be 0 or more seconds (got {self.backoff_initial_s:g})."),
            (self.backoff_max_s >= self.backoff_initial_s, "The maximum backoff must be at least the initial backoff."),
            (all(p is None or (math.isfinite(p) and p >= 0) for p in (self.price_input_per_mtok,
                                                                     self.price_output_per_mtok)),
             "--price-in and --price-out must be 0 or more US dollars per million tokens."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def record(self) -> dict:
        """The settings as written next to results: no secrets (the key is not a field, and the URL's user
        name and password are removed)."""
        return {**asdict(self), "base_url": redact_url(self.base_url)}

    def prices(self) -> tuple[float, float] | None:
        if self.price_input_per_mtok is not None and self.price_output_per_mtok is not None:
            return self.price_input_per_mtok, self.price_output_per_mtok
        return PRICES_PER_MTOK.get(self.model)


def redact_url(url: str | None) -> str | None:
    """``url`` without its user name and password (``https://user:secret@host/v1`` -> ``https://***@host/v1``)
    and without query values (some gateways take a key as ``?api-key=``): the form every record uses."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{item.split('=', 1)[0]}=***" for item in parts.query.split("&") if item) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def resolve_api_key(environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    for name in API_KEY_VARIABLES:
        if env.get(name):
            return env[name]
    return None


def resolve_base_url(explicit: str | None = None, environ: dict | None = None) -> str | None:
    if explicit:
        return explicit
    env = os.environ if environ is None else environ
    for name in BASE_URL_VARIABLES:
        if env.get(name):
            return env[name]
    return None


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class _RequestSlots:
    """Evenly spaced request starts: at most ``per_minute`` per minute (a leaky bucket)."""

    def __init__(self, per_minute: float | None):
        self.interval_s = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval_s:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval_s
        if start > now:
            await asyncio.sleep(start - now)


class JudgeClient:
    """Judge many :class:`JudgeCall` s concurrently through the official ``openai`` package.

    ``complete(calls)`` returns one :class:`JudgeReply` per call, in order; a call that still fails after
    the retries comes back with ``ok=False`` (never silently dropped). ``api_key=None`` reads the
    environment; a missing key raises a :class:`~kdbench.errors.KdbenchError` on the first real call
    (cached judgments need no key).
    """

    def __init__(self, settings: ClientSettings, *, cache_path: str | os.PathLike | None = None,
                 api_key: str | None = None, progress: Callable[[int, int], None] | None = None,
                 rng: random.Random | None = None):
        self.settings = settings
        self.settings.base_url = resolve_base_url(settings.base_url)
        self.cache = JudgmentCache(cache_path or default_cache_path(settings.model))
        self._api_key = api_key
        self.progress = progress
        self.stats = UsageStats()
        self._rng = rng or random.Random()
        self._ever_succeeded = False

    # -- public ---------------------------------------------------------------------------
    @property
    def has_api_key(self) -> bool:
        """Whether a key was given or is set in the environment (its value is never exposed)."""
        return bool(self._api_key or resolve_api_key())

    def keys(self, calls: Iterable[JudgeCall]) -> list[str]:
        return [call.cache_key(self.settings.model) for call in calls]

    def dry_run(self, calls: Sequence[JudgeCall]) -> DryRunEstimate:
        """Count the calls (and their tokens) a run would make, without making any."""
        unique: dict[str, JudgeCall] = dict(zip(self.keys(calls), calls))
        to_make = [call for key, call in unique.items() if key not in self.cache]
        prompt_tokens = sum(estimate_tokens(call.prompt_chars()) for call in to_make)
        completion_max = sum(int(call.param_dict().get("max_tokens") or 0) for call in to_make)
        prices = self.settings.prices()
        cost = (prompt_tokens * prices[0] + completion_max * prices[1]) / 1e6 if prices else None
        return DryRunEstimate(len(unique), len(unique) - len(to_make), len(to_make), prompt_tokens, completion_max,
                              cost)

    def complete(self, calls: Sequence[JudgeCall]) -> list[JudgeReply]:
        """Synchronous wrapper around :meth:`acomplete` (runs its own event loop)."""
        return asyncio.run(self.acomplete(calls))

    async def acomplete(self, calls: Sequence[JudgeCall]) -> list[JudgeReply]:
        keys = self.keys(calls)
        unique: dict[str, JudgeCall] = {}
        for key, call in zip(keys, calls):
            unique.setdefault(key, call)
        replies: dict[str, JudgeReply] = {}
        pending: list[tuple[str, JudgeCall]] = []
        for key, call in unique.items():
            hit = self.cache.get(key)
            if hit is not None:
                replies[key] = self._reply_from_record(hit, cached=True)
                self.stats.calls_cached += 1
                self.stats.prompt_tokens_cached += int(hit.get("usage", {}).get("prompt_tokens") or 0)
                self.stats.completion_tokens_cached += int(hit.get("usage", {}).get("completion_tokens") or 0)
                self._count_model(hit.get("model_reported"))
            else:
                pending.append((key, call))
        done = len(replies)
        total = len(unique)
        if self.progress:
            self.progress(done, total)
        if pending:
            client = self._openai_client()
            semaphore = asyncio.Semaphore(self.settings.concurrency)
            slots = _RequestSlots(self.settings.requests_per_minute)

            async def run_one(key: str, call: JudgeCall) -> None:
                nonlocal done
                replies[key] = await self._call_with_retries(client, semaphore, slots, key, call)
                done += 1
                if self.progress:
                    self.progress(done, total)

            tasks = [asyncio.create_task(run_one(key, call)) for key, call in pending]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                await client.close()
        return [replies[key] for key in keys]

    # -- internals ------------------------------------------------------------------------
    def _openai_client(self):
        from openai import AsyncOpenAI

        key = self._api_key or resolve_api_key()
        if not key:
            raise KdbenchError(
                f"No judge API key: set {API_KEY_VARIABLES[0]} or {API_KEY_VARIABLES[1]} in the environment "
                "(or use --dry-run / the offline judge)."
            )
        # Retries are ours (with jitter, a cache write per success and a failure count), not the SDK's.
        return AsyncOpenAI(api_key=key, base_url=self.settings.base_url, max_retries=0,
                           timeout=self.settings.timeout_s)

    def _count_model(self, model: str | None) -> None:
        if model:
            self.stats.models_reported[model] = self.stats.models_reported.get(model, 0) + 1

    def _fail(self, key: str, reason: str, attempts: int) -> JudgeReply:
        self.stats.calls_failed += 1
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        return JudgeReply(key=key, ok=False, attempts=attempts, error=reason)

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.settings.backoff_max_s)
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * (2 ** attempt))
        return self._rng.uniform(0.0, ceiling)  # "full jitter" (AWS architecture blog, 2015)

    async def _call_with_retries(self, client, semaphore, slots, key: str, call: JudgeCall) -> JudgeReply:
        """One judgment with retries. Retried: 429, 5xx, 408/409, timeouts, connection errors and malformed
        responses; fatal for the run (KdbenchError): 401/403/404 and an endpoint that cannot be reached at all.
        Anything else wrong with one response fails that judgment only (the other calls go on)."""
        import openai

        params = call.param_dict()
        attempts = 0
        last_reason = "unknown"
        while True:
            retry_after_s = None
            await slots.wait()
            attempts += 1
            try:
                async with semaphore:
                    response = await client.chat.completions.create(
                        model=self.settings.model, messages=call.message_dicts(), **params)
                record = self._record_from_response(key, response)
            except openai.APIStatusError as err:
                status = err.status_code
                if status in (401, 403):
                    raise KdbenchError(
                        f"The judge endpoint rejected the API key (HTTP {status}); check "
                        f"{API_KEY_VARIABLES[0]} / {API_KEY_VARIABLES[1]}.") from None
                if status == 404:
                    raise KdbenchError(
                        f"The judge endpoint does not know model {self.settings.model!r} (HTTP 404); check "
                        "--judge-model and the base URL.") from None
                if status not in (408, 409, 429) and status < 500:
                    return self._fail(key, f"http_{status}", attempts)  # e.g. prompt too long: not retryable
                last_reason = "rate_limited" if status == 429 else f"http_{status}"
                retry_after_s = _retry_after_s(err)
            except openai.APITimeoutError:
                last_reason = "timeout"
            except openai.APIConnectionError as err:
                last_reason = "unreachable" if _is_connect_failure(err) else "connection_error"
            except (_MalformedResponse, json.JSONDecodeError, ValueError, openai.APIResponseValidationError) as err:
                # a 200 whose body is not JSON (JSONDecodeError is a ValueError), does not fit the response
                # schema (pydantic's ValidationError is one too), or has no usable choice
                last_reason = f"malformed_response: {type(err).__name__}"
            else:
                # on disk (fsynced) before the reply is used; in a worker thread so that other requests keep
                # flowing while this one waits for the disk
                await asyncio.to_thread(self.cache.put, record)
                self._ever_succeeded = True
                self.stats.calls_made += 1
                self.stats.prompt_tokens += int(record["usage"].get("prompt_tokens") or 0)
                self.stats.completion_tokens += int(record["usage"].get("completion_tokens") or 0)
                self._count_model(record.get("model_reported"))
                reply = self._reply_from_record(record, cached=False)
                reply.attempts = attempts
                return reply
            if attempts > self.settings.max_retries:
                self._raise_if_unreachable(last_reason, attempts)
                return self._fail(key, last_reason.split(":")[0], attempts)
            self.stats.retries += 1
            await asyncio.sleep(self._backoff_s(attempts - 1, retry_after_s))

    def _raise_if_unreachable(self, last_reason: str, attempts: int) -> None:
        """An endpoint that never answered any call: no judgment can succeed, so stop with one sentence."""
        if self._ever_succeeded or last_reason not in ("timeout", "unreachable"):
            return
        where = redact_url(self.settings.base_url) or "the default OpenAI endpoint"
        if last_reason == "timeout":
            raise KdbenchError(
                f"Every call to the judge endpoint at {where} timed out after {attempts} attempt(s) of "
                f"{self.settings.timeout_s:g} s; raise --timeout-s, or check that the server is up and answering.")
        raise KdbenchError(
            f"Could not reach the judge endpoint at {where} after {attempts} attempt(s); check the base URL "
            "and that the server is up.")

    def _record_from_response(self, key: str, response) -> dict:
        choices = getattr(response, "choices", None) or []
        if not choices or getattr(choices[0], "message", None) is None:
            raise _MalformedResponse("no choices")
        if not isinstance(getattr(choices[0].message, "content", None), (str, type(None))):
            raise _MalformedResponse("content is not text")
        choice = choices[0]
        top = None
        logprobs = getattr(choice, "logprobs", None)
        content_logprobs = getattr(logprobs, "content", None) if logprobs is not None else None
        if content_logprobs:
            top = [{"token": t.token, "logprob": float(t.logprob)} for t in (content_logprobs[0].top_logprobs or [])]
        usage = getattr(response, "usage", None)
        return {
            "key": key,
            "judge_model": self.settings.model,
            "model_reported": getattr(response, "model", None),
            "content": choice.message.content,
            "top_logprobs": top,
            "finish_reason": getattr(choice, "finish_reason", None),
            "usage": {"prompt_tokens": getattr(usage, "prompt_tokens", None),
                      "completion_tokens": getattr(usage, "completion_tokens", None)} if usage else {},
            "created": time.time(),
        }

    @staticmethod
    def _reply_from_record(record: dict, *, cached: bool) -> JudgeReply:
        return JudgeReply(key=record["key"], ok=True, content=record.get("content"),
                          top_logprobs=record.get("top_logprobs"), model_reported=record.get("model_reported"),
                          usage=record.get("usage") or {}, cached=cached, finish_reason=record.get("finish_reason"))


class _MalformedResponse(Exception):
    pass


def _is_connect_failure(err) -> bool:
    """Whether a connection error means the server could not be reached at all (refused, no route, unknown
    host), as opposed to a connection that broke mid-response (a body cut off in transit: the server is there).

    The cause chain is inspected by class name: the openai SDK wraps the HTTP library's errors (httpx, or its
    vendored copy in newer SDKs) and those wrap the OS error."""
    import socket

    cause = err.__cause__ or err.__context__
    if cause is None:
        return True
    seen = 0
    while cause is not None and seen < 10:
        if isinstance(cause, (ConnectionRefusedError, socket.gaierror)) or type(cause).__name__ in (
                "ConnectError", "ConnectTimeout"):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def _retry_after_s(err) -> float | None:
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


__all__ = ["API_KEY_VARIABLES", "BASE_URL_VARIABLES", "CACHE_SCHEMA", "PRICES_PER_MTOK", "ClientSettings",
           "DryRunEstimate", "JudgeCall", "JudgeClient", "JudgeReply", "JudgmentCache", "UsageStats",
           "default_cache_path", "estimate_tokens", "redact_url", "resolve_api_key", "resolve_base_url"]
