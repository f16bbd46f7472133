"""The execution edge: the node's local Ollama, through the official client.

The node never reaches a model any other way (DESIGN §6), so the Ollama
stand-in in tests and a real Ollama take exactly the same path. This module
translates the client's exceptions once, at the edge: a refused connection,
a timeout or an HTTP error all become ``ExecutionFailed`` with a message a
person can act on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import httpx
import ollama

from p2pgpu.errors import ExecutionFailed

log = logging.getLogger(__name__)

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"


def default_ollama_host() -> str:
    """``OLLAMA_HOST`` as the official client reads it, else Ollama's default."""
    return os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    size_bytes: int | None
    warm: bool  # loaded in memory right now (from /api/ps): first token comes fast


class OllamaBackend:
    """The local Ollama, as the provider side of a node sees it."""

    def __init__(self, host: str | None = None, *, timeout_s: float = 10.0) -> None:
        self.host = host or default_ollama_host()
        self._timeout_s = timeout_s

    def _client(self) -> ollama.AsyncClient:
        # One client per call: httpx async clients are bound to the event loop
        # they were first used in, and inventory calls are rare (one per
        # heartbeat), so the connection setup is not worth keeping.
        return ollama.AsyncClient(host=self.host, timeout=self._timeout_s)

    async def models(self) -> list[LocalModel]:
        """Every model this Ollama serves (``/api/tags``), marked warm when
        ``/api/ps`` lists it as loaded. Raises ``ExecutionFailed``."""
        client = self._client()
        try:
            tags = await client.list()
            loaded = await client.ps()
        except (ConnectionError, httpx.HTTPError, ollama.ResponseError) as exc:
            raise ExecutionFailed(f"Ollama at {self.host} did not answer: {_describe(exc)}") from exc
        warm = {m.model for m in loaded.models if m.model}
        # sizes arrive as pydantic ByteSize; the wire wants plain ints
        return [LocalModel(m.model, None if m.size is None else int(m.size), m.model in warm) for m in tags.models if m.model]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ollama.ResponseError):
        return f"HTTP {exc.status_code}: {exc.error}"
    if isinstance(exc, (ConnectionError, httpx.ConnectError)):
        return "connection refused (is Ollama running? set OLLAMA_HOST or --ollama-host)"
    return str(exc) or type(exc).__name__
