"""A local OpenAI-compatible chat-completions server for the judge tests and benchmarks.

Real HTTP on 127.0.0.1 (stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive), so the real ``openai``
client is exercised end to end. Faults are injected per prompt and attempt by a ``faults(prompt_id,
attempt) -> str | None`` function: ``"429"`` (with ``Retry-After``), ``"500"``, ``"timeout"`` (the server
sleeps past the client's timeout), ``"drop"`` (the connection is closed without a response) and
``"garbage"`` (a 200 whose verdict cannot be parsed), ``"badjson"`` (a 200 whose body is not JSON) and
``"truncated"`` (a 200 whose body stops halfway: the connection closes before Content-Length bytes). A
``responder(messages, params) -> (content, top_logprobs)`` produces the verdicts.

Run as a script (``python tests/judge_server.py --port 0 --latency-ms 100``) it prints its URL and serves
until killed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

REPORTED_MODEL = "fake-judge-2025-01-01"


def prompt_id(messages: list[dict]) -> str:
    """A stable id of a request's messages (what the fault plan and the call log are keyed by)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def default_responder(messages: list[dict], params: dict) -> tuple[str, list[dict] | None]:
    """Deterministic verdicts in each protocol's format, derived from the prompt text."""
    text = "\n".join(m["content"] for m in messages)
    digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    if params.get("logprobs"):  # AlpacaEval 2.0 classifier: one token, m or M, with top logprobs
        p_m = (digest % 1000) / 1000 * 0.98 + 0.01
        import math

        top = [{"token": "m", "logprob": math.log(p_m)}, {"token": "M", "logprob": math.log(1 - p_m)},
               {"token": "The", "logprob": -15.0}]
        return ("m" if p_m >= 0.5 else "M"), top
    if "[[rating]]" in text:
        return f"The answer is fine. Rating: [[{1 + digest % 10}]]", None
    if "[[A]]" in text:
        return f"Explanation. [[{'ABC'[digest % 3]}]]", None
    if "'rank'" in text or "rank" in text:
        first = 1 + digest % 2
        return f"[{{'model': 'model_1', 'rank': {first}}}, {{'model': 'model_2', 'rank': {3 - first}}}]", None
    return "ok", None


class FakeJudgeServer:
    """Start with ``with FakeJudgeServer(...) as server: server.url``; ``server.calls`` counts requests
    per prompt id and ``server.successes`` the 200 responses with a valid verdict or an unparseable one."""

    def __init__(self, *, api_key: str = "sk-test", latency_s: float = 0.0, timeout_sleep_s: float = 3.0,
                 faults: Callable[[str, int], str | None] | None = None,
                 responder: Callable[[list[dict], dict], tuple[str, list[dict] | None]] = default_responder,
                 reported_model: str = REPORTED_MODEL):
        self.api_key = api_key
        self.latency_s = latency_s
        self.timeout_sleep_s = timeout_sleep_s
        self.faults = faults or (lambda pid, attempt: None)
        self.responder = responder
        self.reported_model = reported_model
        self.calls: Counter = Counter()
        self.successes: Counter = Counter()
        self.fault_log: Counter = Counter()
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def start(self, port: int = 0) -> "FakeJudgeServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                    return self._json(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._json(404, {"error": {"message": "no such route"}})
                messages = body.get("messages", [])
                pid = prompt_id(messages)
                with owner._lock:
                    owner.calls[pid] += 1
                    attempt = owner.calls[pid]
                    owner._in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
                try:
                    fault = owner.faults(pid, attempt)
                    if fault:
                        with owner._lock:
                            owner.fault_log[fault] += 1
                    if owner.latency_s:
                        time.sleep(owner.latency_s)
                    if fault == "429":
                        return self._json(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                          headers={"Retry-After": "0.05"})
                    if fault == "500":
                        return self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                    if fault == "timeout":
                        time.sleep(owner.timeout_sleep_s)
                        return self._json(500, {"error": {"message": "too late"}})
                    if fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                    if fault == "badjson":
                        return self._raw(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "message": <html>')
                    if fault == "truncated":
                        return self._raw(200, b'{"id": "chatcmpl-x", "object": "chat.completion", "choi',
                                         declared_length=400)
                    params = {k: v for k, v in body.items() if k not in ("messages", "model")}
                    if fault == "garbage":
                        content, top = "I cannot decide, both are nice.", None
                        if params.get("logprobs"):
                            top = [{"token": "Both", "logprob": -0.1}, {"token": "The", "logprob": -3.0}]
                    else:
                        content, top = owner.responder(messages, params)
                    with owner._lock:
                        owner.successes[pid] += 1
                    choice = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop", "logprobs": None}
                    if top is not None:
                        entries = [{"token": t["token"], "logprob": t["logprob"], "bytes": None} for t in top]
                        choice["logprobs"] = {"content": [{"token": content, "logprob": top[0]["logprob"],
                                                           "bytes": None, "top_logprobs": entries}]}
                    prompt_tokens = sum(len(m.get("content", "")) for m in messages) // 4
                    completion_tokens = max(1, len(content) // 4)
                    return self._json(200, {
                        "id": f"chatcmpl-{pid}-{attempt}", "object": "chat.completion", "created": int(time.time()),
                        "model": owner.reported_model, "choices": [choice],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}})
                finally:
                    with owner._lock:
                        owner._in_flight -= 1

            def _raw(self, status: int, data: bytes, declared_length: int | None = None):
                """A response body as given; with ``declared_length`` the header promises more bytes than are
                sent and the connection is closed (a body cut off in transit)."""
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(declared_length or len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    if declared_length:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

            def _json(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # a connection the test cut on purpose ("drop", "truncated") fails to flush afterwards: expected,
                # and never printed into the stderr of whatever test runs next
                import sys

                if not isinstance(sys.exc_info()[1], OSError):
                    super().handle_error(request, client_address)

        self._server = QuietServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "FakeJudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default="sk-test")
    args = parser.parse_args()
    server = FakeJudgeServer(api_key=args.api_key, latency_s=args.latency_ms / 1000).start(args.port)
    print(server.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["FakeJudgeServer", "default_responder", "prompt_id", "REPORTED_MODEL"]
