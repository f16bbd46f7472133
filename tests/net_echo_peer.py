"""A p2pgpu host in its own OS process, for tests/test_net_host.py.

    python tests/net_echo_peer.py <seed hex>

Listens on 127.0.0.1 (free port), serves ``/p2pgpu/job/1.0.0`` by answering
each frame with ``b"echo:" + frame``, prints ``ADDR <multiaddr>`` once ready,
and runs until SIGTERM/SIGINT or until its stdin closes. Watching stdin means
the process also ends if the test runner dies without cleaning up.
"""

from __future__ import annotations

import os
import signal
import sys

import trio

from p2pgpu.core.identity import NodeKey
from p2pgpu.core.protocols import JOB_PROTOCOL
from p2pgpu.net import FrameStream, open_host


async def echo(stream: FrameStream) -> None:
    while (frame := await stream.receive_frame()) is not None:
        await stream.send_frame(b"echo:" + frame)


async def wait_for_stdin_eof() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            pass


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def main(seed_hex: str) -> None:
    async with open_host(NodeKey(bytes.fromhex(seed_hex))) as host:
        host.set_stream_handler(JOB_PROTOCOL, echo)
        print("ADDR", host.listen_addrs()[0], flush=True)
        async with trio.open_nursery() as nursery:

            async def first_of(waiter):  # type: ignore[no-untyped-def]
                await waiter()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first_of, wait_for_stdin_eof)
            nursery.start_soon(first_of, wait_for_signal)
    print("BYE", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
