"""A chat-completions client for any OpenAI-compatible endpoint (vLLM, SGLang, TGI, hosted APIs).

Synthesis only needs "messages in, text out", so the client is that callable:
``ChatClient(...)(messages) -> str``. Anything with the same call shape (a local model wrapped
in a function, a test's fake) can take its place.

Transient failures (connection errors, dropped connections, timeouts, HTTP 408/409/429/5xx) are
retried with exponential backoff, honouring ``Retry-After`` (seconds or an HTTP date). ``timeout``
bounds a whole answer's body, not each read of it (a server trickling bytes times out too). Anything else raises ``LLMError`` with
the status and the start of the server's answer. ``fatal`` tells the caller whether another
prompt could succeed: a bad key or model name (401/403/404) is fatal; a prompt over the model's
context (HTTP 400), an answer without content, or a request that kept failing through every
retry (the server may fail on that prompt alone) are not: the caller counts failures in a row to
tell an endpoint that is down. Until the endpoint has answered once, a refused connection or an
unknown host name is fatal at the first try (a wrong --llm-url); after that it is a restart, and
retried. ``cancel()`` ends the backoff waits at once (a stopping run).

``extra_body`` is merged into each request; a ``None`` value removes a field (``{"temperature":
None, "max_tokens": None, "max_completion_tokens": 4096}`` for endpoints that refuse the classic
sampling fields).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = ["LLM", "LLMError", "ChatClient"]

Message = Mapping[str, str]
LLM = Callable[[Sequence[Message]], str]

log = logging.getLogger(__name__)
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_FATAL_STATUS = {401, 402, 403, 404, 405}


class LLMError(RuntimeError):
    """The endpoint refused or answered something that is not a chat completion.

    ``kind`` is a short category for counts ("HTTP 400", "answer without content"); ``fatal`` is
    True when no other prompt can succeed either."""

    def __init__(self, message: str, *, fatal: bool = False, kind: str = "error"):
        super().__init__(message)
        self.fatal = fatal
        self.kind = kind


@dataclass
class ChatClient:
    """POST {base_url}/chat/completions; returns the first choice's message content.

    ``api_key_env`` names the environment variable holding the key (read at each call, so a key is
    never stored in configs or logs); no variable or an empty one sends no Authorization header,
    as local servers expect.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.8
    max_tokens: int = 2048
    timeout: float = 120.0
    retries: int = 6
    backoff: float = 2.0
    extra_body: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--llm-url: expected an http(s) URL such as http://localhost:8000/v1, "
                             f"got {self.base_url!r}")
        if not self.model:
            raise ValueError("--llm-model: the model name the endpoint serves is required")
        if self.retries < 0 or self.timeout <= 0:
            raise ValueError(f"retries must be >= 0 and timeout > 0, got {self.retries} and {self.timeout}")
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self.calls = 0
        self.retried = 0
        self.answered = 0  # calls that got a completion: before the first, an unreachable server is fatal
        self._warned = False
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop waiting between retries: pending and later calls raise a fatal LLMError."""
        self._cancelled.set()

    def _request(self, messages: Sequence[Message]) -> urllib.request.Request:
        body = {"model": self.model, "messages": [dict(m) for m in messages],
                "temperature": self.temperature, "max_tokens": self.max_tokens, **(self.extra_body or {})}
        body = {k: v for k, v in body.items() if v is not None}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")

    def settings(self) -> dict[str, Any]:
        """What shapes the answers (not the URL or the key), for a resumed run's check."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "extra_body": dict(self.extra_body or {})}

    @staticmethod
    def _retry_after(value: str | None) -> float | None:
        """Seconds a Retry-After header asks for: a number of seconds or an HTTP date."""
        if not value:
            return None
        try:
            return float(value)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        return when.timestamp() - time.time()

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** attempt * (0.5 + random.random() / 2)
        asked = self._retry_after(retry_after)
        if asked is not None:
            delay = max(delay, asked)
        if self._cancelled.wait(min(delay, 300.0)):
            raise LLMError("cancelled", fatal=True, kind="cancelled")
        with self._lock:
            self.retried += 1

    def __call__(self, messages: Sequence[Message]) -> str:
        with self._lock:
            self.calls += 1
        last = ""
        for attempt in range(self.retries + 1):
            if self._cancelled.is_set():
                raise LLMError("cancelled", fatal=True, kind="cancelled")
            retry_after = None
            try:
                deadline = time.monotonic() + self.timeout
                with urllib.request.urlopen(self._request(messages), timeout=self.timeout) as resp:
                    raw = self._read(resp, deadline)
                content = self._content(raw)
                with self._lock:
                    self.answered += 1
                return content
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read(300).decode("utf-8", "replace")
                except (OSError, http.client.HTTPException) as cut:  # a body cut or stalled: the status is enough
                    detail = f"(body unreadable: {cut!r})"
                last = f"HTTP {e.code} from {self.url}: {detail}"
                if e.code not in _RETRY_STATUS:
                    raise LLMError(last, fatal=e.code in _FATAL_STATUS, kind=f"HTTP {e.code}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = f"{self.url}: {reason}"
                unknown_host = isinstance(reason, socket.gaierror) and reason.errno != socket.EAI_AGAIN
                if not self.answered and (isinstance(reason, ConnectionRefusedError) or unknown_host):
                    # nothing listens there (a wrong host or port): retrying for minutes helps nobody
                    raise LLMError(f"cannot reach {self.url}: {reason}; is the server running, and are the host "
                                   "and port of --llm-url right?", fatal=True, kind="unreachable") from None
            if attempt < self.retries:
                if not self._warned:
                    self._warned = True
                    log.warning("LLM request failed (%s); retrying up to %d times with backoff", last, self.retries)
                self._wait(attempt, retry_after)
        raise LLMError(f"gave up after {self.retries + 1} tries: {last}", kind="no answer after retries")

    def _read(self, resp, deadline: float) -> bytes:
        """The body, within ``deadline`` (the socket's timeout bounds each read only)."""
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer within {self.timeout:g} s")
            if sock is not None:
                sock.settimeout(left)
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        raw = b"".join(chunks)
        if resp.length:  # read1 returns b"" where read() would raise: the connection closed early
            raise http.client.IncompleteRead(raw, resp.length)
        return raw

    def _content(self, raw: bytes) -> str:
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LLMError(f"{self.url}: answer is not JSON: {raw[:200]!r}", kind="answer is not JSON") from None
        try:
            choice = obj["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url}: answer has no choices[0].message.content: {str(obj)[:300]}",
                           kind="answer without content") from None
        if not isinstance(content, str) or not content.strip():
            raise LLMError(f"{self.url}: empty answer (finish_reason {choice.get('finish_reason')!r})",
                           kind="answer without content")
        return content
