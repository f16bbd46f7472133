"""A small synchronous client of the node's local HTTP API (``p2pgpu.api``).

An edge, used by the CLI. Its methods mirror ``p2pgpu.api.NodeView`` and
return the same JSON shapes. As httpx's own ``map_exceptions`` does, every
failure is translated in one place (``ApiClient._errors`` for the transport,
``ApiClient._answer`` for what came back; ``_call`` and the streaming
``submit`` share both), so callers only ever see ``P2PGPUError``:

- no ``api.addr`` in the data dir, or nothing listening at the address it
  names (the node stopped, or crashed and left the file behind):
  ``NodeNotRunning``;
- 401: ``TokenMismatch``, which says why that happens in practice; also
  when ``api.token`` is missing while the node answers (a new token from
  ``p2pgpu init`` would not match the one the node holds: restart it);
- an error answer ``{"error": ..., "type": ...}``: the ``p2pgpu.errors``
  class of that name when there is one (so ``InsufficientFunds`` stays
  ``InsufficientFunds``), else ``ApiError``, with the server's message;
- anything else (a timeout, a dropped connection, an answer that is not the
  API's JSON): ``ApiError``.

The client never reads proxy settings from the environment (``trust_env``
off): a ``HTTP_PROXY`` meant for the web must not receive the node's token.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Final

import httpx

from p2pgpu import errors
from p2pgpu.api import api_address_path, read_api_address
from p2pgpu.datadir import DataDir
from p2pgpu.errors import MalformedInput, P2PGPUError

__all__ = ["ApiClient", "ApiError", "NodeNotRunning", "TokenMismatch"]

# Reads are answered from memory at once; a send waits for one ledger write.
# Generous, because the CLI would rather wait than give up on a busy node.
DEFAULT_TIMEOUT_S: Final = 30.0


class NodeNotRunning(P2PGPUError):
    """Nothing answers at the node's local API: start it with ``p2pgpu node run``."""


class TokenMismatch(P2PGPUError):
    """The API refused this data dir's token (401)."""


class ApiError(P2PGPUError):
    """The API failed or answered something this client cannot read.

    ``status`` is the HTTP status when there was an answer, else None.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _not_running(where: str) -> NodeNotRunning:
    return NodeNotRunning(f"the node is not running (no local API at {where}); start it with `p2pgpu node run`")


def _answers(url: str) -> bool:
    """Does anything accept a TCP connection at the API address ``url``
    (``http://127.0.0.1:PORT``, as ``read_api_address`` returns it)?"""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return True
    except (OSError, ValueError):
        return False


def _job_path(job_id: str) -> str:
    """A job id as one path segment: anything but hex is refused here, so
    no id can change which route (or which node's route) is asked."""
    text = job_id.strip()
    if not text or not all(ch in "0123456789abcdefABCDEF" for ch in text):
        raise MalformedInput(f"{job_id[:80]!r} is not a job id: expected hex digits (an id or the start of one)")
    return text


def _error_class(name: Any) -> type[P2PGPUError]:
    """The ``p2pgpu.errors`` class the server named, or ``ApiError``. Only
    names of ``P2PGPUError`` subclasses defined there are honoured: the name
    comes off the wire and must not pick any other attribute."""
    found = getattr(errors, name, None) if isinstance(name, str) and name.isidentifier() else None
    if isinstance(found, type) and issubclass(found, P2PGPUError):
        return found
    return ApiError


class ApiClient:
    """Talks to one node's local API. Use as a context manager, or ``close()``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        data_dir: DataDir | None = None,
    ) -> None:
        self.base_url = base_url
        self._data_dir = data_dir  # only to name it in errors
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            trust_env=False,
            follow_redirects=False,
            transport=transport,
            # The API is plain http on 127.0.0.1 (read_api_address accepts
            # nothing else), so no TLS is ever spoken; without this httpx
            # builds an SSL context from the CA bundle anyway, 30-40 ms of
            # CPU on every CLI command and every ``submit``.
            verify=False,
        )

    @classmethod
    def from_data_dir(cls, data_dir: DataDir, *, timeout: float = DEFAULT_TIMEOUT_S) -> ApiClient:
        """A client for the node running from ``data_dir``.

        The address comes first: without ``api.addr`` the node is not
        running, which is the useful thing to say even when the token is
        missing too. The token is then read with the data dir's checks
        (``IdentityError`` if it is missing or open to other users).
        """
        url = read_api_address(data_dir)
        if url is None:
            raise _not_running(f"{data_dir.path}: no {api_address_path(data_dir).name} file")
        if not os.path.lexists(data_dir.token_path) and _answers(url):
            # `p2pgpu init` would make a new token, which the running node
            # (holding the old one in memory) would refuse: say so first.
            raise TokenMismatch(
                f"no API token at {data_dir.token_path}, but a node is running from this data dir ({url}): "
                "its token was removed after it started. Restart the node (stop it, then `p2pgpu node run`): "
                "it writes a new token; `p2pgpu init` alone would write one the running node does not know"
            )
        token = data_dir.load_or_create_token(create=False)
        return cls(url, token, timeout=timeout, data_dir=data_dir)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------- the view

    def ping(self) -> bool:
        return self._call("GET", "/v1/ping").get("ok") is True

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status")

    def peers(self) -> list[dict[str, Any]]:
        return self._list(self._call("GET", "/v1/peers"), "peers")

    def offers(self, model: str | None = None) -> list[dict[str, Any]]:
        params = {"model": model} if model else None
        return self._list(self._call("GET", "/v1/offers", params=params), "offers")

    def wallet(self, account: str | None = None) -> dict[str, Any]:
        params = {"account": account} if account else None
        return self._call("GET", "/v1/wallet", params=params)

    def send(self, to: str, amount: int, memo: str = "") -> dict[str, Any]:
        return self._call("POST", "/v1/send", body={"to": to, "amount": amount, "memo": memo})

    def faucet(self, to: str, amount: int) -> dict[str, Any]:
        return self._call("POST", "/v1/faucet", body={"to": to, "amount": amount})

    def jobs(self, role: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """This node's jobs, newest first (``p2pgpu.api.JobInfo``)."""
        params: dict[str, str] = {}
        if role:
            params["role"] = role
        if limit is not None:
            params["limit"] = str(limit)
        return self._list(self._call("GET", "/v1/jobs", params=params or None), "jobs")

    def job(self, job_id: str) -> dict[str, Any]:
        """One job by id or unique id prefix (``p2pgpu.api.JobDetail``)."""
        return self._call("GET", f"/v1/jobs/{_job_path(job_id)}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Stop a job; answers its record once it stopped (``p2pgpu.api.JobInfo``)."""
        return self._call("POST", f"/v1/jobs/{_job_path(job_id)}/cancel")

    def submit(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[tuple[str, str]] | None = None,
        system: str | None = None,
        max_tokens: int = 256,
        max_price: int | None = None,
        retry: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Run a job: yields the node's events (``p2pgpu.api.NodeView.submit``)
        as they arrive, ending with the ``done`` or ``error`` event.

        Errors before the stream starts are raised as for every other call.
        No read timeout applies while streaming: a model may think for a long
        time between tokens. A stream that ends without a final event, or a
        line that is not an event, is an ``ApiError``. Closing the generator
        early closes the connection, which makes the node cancel the job.
        """
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "retry": retry}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = [[role, content] for role, content in messages]
        if system is not None:
            body["system"] = system
        if max_price is not None:
            body["max_price"] = max_price
        timeout = httpx.Timeout(self._timeout, read=None)
        with self._errors(), self._http.stream("POST", "/v1/submit", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                self._answer(response)  # raises for every error answer
                raise ApiError(f"unexpected answer from {self.base_url} (HTTP {response.status_code})")
            if not response.headers.get("content-type", "").startswith("application/x-ndjson"):
                raise ApiError(f"unexpected answer from {self.base_url} (not the node's event stream)", 200)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    raise ApiError(f"unexpected line in the node's event stream: {line[:200]!r}")
                yield event
                if event["type"] in ("done", "error"):
                    return
        raise ApiError(f"the node's local API at {self.base_url} ended the job's stream without a result")

    # ------------------------------------------------------------- the edge

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Transport failures as ``P2PGPUError``."""
        try:
            yield
        except httpx.ConnectError:
            raise _not_running(self.base_url) from None
        except httpx.TimeoutException:
            raise ApiError(f"the node's local API at {self.base_url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"lost the connection to the node's local API at {self.base_url}: {exc}") from None

    def _list(self, answer: dict[str, Any], key: str) -> list[dict[str, Any]]:
        items = answer.get(key)
        if not isinstance(items, list):
            raise ApiError(f"unexpected answer from the node's local API at {self.base_url}: no {key!r} list")
        return items

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One request and its JSON answer."""
        with self._errors():
            response = self._http.request(method, path, params=params, json=body)
        return self._answer(response)

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        """A read answer's JSON object; error answers raised as ``P2PGPUError``."""
        try:
            answer = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            answer = None
        status = response.status_code
        if status == 401:
            where = f" in {self._data_dir.path}" if self._data_dir is not None else ""
            raise TokenMismatch(
                f"the API token{where} does not match the running node's (token mismatch; "
                f"its API at {self.base_url} refused it): api.token was replaced after the node started "
                "(`p2pgpu init` does that when the token is missing), or the node runs from another data dir. "
                "Restart the node (stop it, then `p2pgpu node run`)"
            )
        if not isinstance(answer, dict):
            raise ApiError(
                f"unexpected answer from {self.base_url} (HTTP {status}, not the node's JSON): "
                "is another program using that port? Restart the node",
                status,
            )
        if status >= 400:
            message = answer.get("error")
            if not isinstance(message, str):
                raise ApiError(f"the node's local API answered HTTP {status} without an error message", status)
            error_class = _error_class(answer.get("type"))
            if error_class is ApiError:
                raise ApiError(message, status)
            raise error_class(message)
        return answer
