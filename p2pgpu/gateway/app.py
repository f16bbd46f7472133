"""The gateway's listener: its own address, who may spend, and the app.

Who may call it
---------------
The gateway spends the node owner's coins, so by default every request
carries the node's API token (``api.token`` in the data dir) as
``Authorization: Bearer <token>``: the ``openai`` client's ``api_key``, the
``ollama`` client's ``headers=``. An owner may choose tokenless use
(``gateway_token = false``), as Ollama works, but only on a loopback
address. A non-loopback address is refused unless the owner explicitly
allows it (``gateway_allow_remote = true``), and then only with the token.
``/`` and ``/api/version`` answer without a token: they say only that a
server is there (Open WebUI's connection check calls them), nothing about
the node.

Whatever the mode, a request whose ``Origin`` header names a web page not
served from this machine is refused (403): with tokenless loopback use, any
web page in the owner's browser could otherwise spend the owner's coins by
posting to 127.0.0.1 (Ollama has ``OLLAMA_ORIGINS`` for the same reason).
Tools such as Open WebUI call from their server, without an ``Origin``.

And whoever calls, the spending limit applies (``p2pgpu.core.spending``):
coins per request and per hour, 429 past either.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from hmac import compare_digest
from typing import Final
from urllib.parse import urlsplit

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from p2pgpu.datadir import DataDir
from p2pgpu.gateway import ollama_api, openai_api
from p2pgpu.gateway.jobs import GatewayError
from p2pgpu.gateway.server import Gateway
from p2pgpu.httpserve import bind_tcp, is_loopback, serve_asgi

log = logging.getLogger(__name__)

__all__ = ["create_app", "serve_gateway", "write_gateway_address", "read_gateway_address", "remove_gateway_address",
           "gateway_url", "GATEWAY_ADDRESS_FILE"]


def create_app(gateway: Gateway) -> ASGIApp:
    """Both surfaces behind the guard."""

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = (f"no such route: {request.method} {request.url.path}" if exc.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}")
        surface = openai_api if request.url.path.startswith("/v1/") else ollama_api
        return surface.error_response(GatewayError(exc.status_code, message, "not_found"))

    app = Starlette(routes=[*ollama_api.routes(gateway), *openai_api.routes(gateway)],
                    exception_handlers={HTTPException: not_found})
    app.router.redirect_slashes = False
    return _Guard(app, gateway.token_digest)


# ------------------------------------------------------------ guard


_OPEN_PATHS: Final = frozenset({"/", "/api/version"})


class _Guard:
    """ASGI middleware: the Origin check, then the token (module docstring).
    Refusals take the shape of the surface asked: OpenAI's under ``/v1/``,
    Ollama's elsewhere."""

    def __init__(self, app: ASGIApp, token_digest: bytes | None) -> None:
        self.app = app
        self._digest = token_digest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            else:
                await receive()
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = dict(scope["headers"])
        refusal = None
        origin = headers.get(b"origin")
        if origin is not None and not _local_origin(origin):
            refusal = GatewayError(403, f"requests from web pages at {origin.decode('latin-1')[:80]} are not "
                                        "allowed: the gateway spends this node's coins", "forbidden_origin")
        elif self._digest is not None and scope["path"] not in _OPEN_PATHS:
            refusal = self._check_token(scope["headers"])
        if refusal is None:
            await self.app(scope, receive, send)
            return
        surface = openai_api if scope["path"].startswith("/v1/") else ollama_api
        await surface.error_response(refusal)(scope, receive, send)

    def _check_token(self, raw_headers: list[tuple[bytes, bytes]]) -> GatewayError | None:
        presented = [value for name, value in raw_headers if name == b"authorization"]
        scheme, _, credentials = presented[0].partition(b" ") if len(presented) == 1 else (b"", b"", b"")
        credentials = credentials.strip()
        challenge = {"WWW-Authenticate": 'Bearer realm="p2pgpu-gateway"'}
        if scheme.lower() != b"bearer" or not credentials:
            return GatewayError(401, "this gateway needs `Authorization: Bearer <token>`, the token being the "
                                     "contents of api.token in the node's data dir (openai: api_key=...; "
                                     "ollama: headers={'Authorization': 'Bearer ...'})", "unauthorized",
                                headers=challenge)
        assert self._digest is not None
        if not compare_digest(hashlib.sha256(credentials).digest(), self._digest):
            return GatewayError(401, "wrong API token (it must match api.token in the node's data dir)",
                                "invalid_api_key", headers=challenge)
        return None


def _local_origin(origin: bytes) -> bool:
    try:
        parts = urlsplit(origin.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return parts.scheme in ("http", "https") and parts.hostname is not None and is_loopback(parts.hostname)



async def serve_gateway(gateway: Gateway, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the gateway on its configured address until cancelled; reports
    the port bound. ``ConfigError``/``AddressInUse`` before anything starts."""
    host, port = gateway.config.address()
    fd = bind_tcp(host, port, what="gateway",
                  hint="is Ollama or another node's gateway there? set gateway_listen, e.g. 127.0.0.1:0 for any port")
    async with trio.open_nursery() as nursery:
        gateway.nursery = nursery
        try:
            bound = await nursery.start(lambda task_status: serve_asgi(
                create_app(gateway), fd, logger=log, name="gateway", task_status=task_status))
            log.info("gateway (Ollama and OpenAI APIs) on http://%s:%d", host, bound)
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------- the address file

GATEWAY_ADDRESS_FILE: Final = "gateway.addr"


def gateway_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_gateway_address(data_dir: DataDir, host: str, port: int) -> Path:
    """Record where the gateway listens (``http://HOST:PORT``) for the CLI and
    scripts, written whole or not at all (temporary file, then rename)."""
    path = data_dir.path / GATEWAY_ADDRESS_FILE
    fd, temp = tempfile.mkstemp(dir=data_dir.path, prefix=f".{GATEWAY_ADDRESS_FILE}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(gateway_url(host, port) + "\n")
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return path


def read_gateway_address(data_dir: DataDir) -> str | None:
    """The recorded gateway URL, or None when the node runs without one."""
    try:
        return (data_dir.path / GATEWAY_ADDRESS_FILE).read_text(encoding="ascii", errors="replace").strip()[:256] or None
    except FileNotFoundError:
        return None


def remove_gateway_address(data_dir: DataDir) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(data_dir.path / GATEWAY_ADDRESS_FILE)
