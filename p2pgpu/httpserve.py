"""Serving an ASGI app on one TCP address with hypercorn under trio.

An edge shared by the node's two HTTP listeners: the local API
(``p2pgpu.api``, 127.0.0.1 only) and the gateway (``p2pgpu.gateway``, its
own address). Both need the same three things hypercorn does not give by
itself: a bind error that is our own ``AddressInUse``/``ConfigError``
(hypercorn leaks the socket whose bind failed and reports the error wrapped
in three exception groups), the port actually bound when 0 was asked for,
and a graceful stop on cancellation (hypercorn's own shutdown path, which a
plain cancellation would skip).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

import hypercorn.config
import hypercorn.trio
import trio
from starlette.types import ASGIApp

from p2pgpu.errors import AddressInUse, ConfigError

__all__ = ["bind_tcp", "serve_asgi", "is_loopback", "SHUTDOWN_GRACE_S"]

# How long a stopping server may take to finish the requests in flight before
# they are cut off.
SHUTDOWN_GRACE_S = 2.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_tcp(host: str, port: int, *, what: str, hint: str) -> int:
    """A TCP socket bound to ``host:port``, as a bare descriptor.

    Bound here rather than by hypercorn so that a taken port is our own
    ``AddressInUse`` (``hint`` says what to do about it). The descriptor is
    detached and handed over as ``fd://N``: from then on hypercorn's
    listener owns it and closes it when serving stops.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"cannot listen on {host}:{port}: the {what} port is in use ({hint})") from exc
        raise ConfigError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror or exc}") from exc
    except (OverflowError, TypeError) as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} for the {what}: {exc}") from exc
    return sock.detach()


async def serve_asgi(
    app: ASGIApp,
    fd: int,
    *,
    logger: logging.Logger,
    name: str,
    grace_s: float = SHUTDOWN_GRACE_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the bound socket ``fd`` (from ``bind_tcp``) until
    cancelled; ``task_status.started`` reports the port.

    Cancelling the surrounding scope stops the server gracefully: the
    listening socket closes, idle keep-alive connections are dropped, and
    requests in flight get up to ``grace_s`` to finish before they
    are cut off. That needs hypercorn's own shutdown path, so hypercorn runs
    in a shielded scope and the cancellation is turned into its shutdown
    trigger, with a deadline on the shield so shutdown can never hang.
    """
    config = hypercorn.config.Config()
    config.accesslog = None
    config.errorlog = logging.getLogger(f"{logger.name}.hypercorn")
    config.include_server_header = False
    config.graceful_timeout = grace_s
    config.bind = [f"fd://{fd}"]
    shutdown = trio.Event()
    server_scope = trio.CancelScope(shield=True)

    async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run_hypercorn)
        bound = int(binds[0].rsplit(":", 1)[1])
        logger.info("%s listening on port %d", name, bound)
        task_status.started(bound)
        try:
            await trio.sleep_forever()
        finally:
            shutdown.set()
            server_scope.deadline = trio.current_time() + grace_s + 1.0
            logger.info("%s on port %d stopping", name, bound)
