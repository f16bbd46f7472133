"""Network namespaces for the local network: what makes a partition real.

On one loopback interface nodes cannot be cut apart: every connection
between them comes from 127.0.0.1, whoever dialled it, and telling processes
apart needs a packet filter (iptables/nft) that a machine may not have. So,
when asked, ``Devnet`` gives every node a network of its own (``Namespaces``)
and moves each node's bridge port to cut and restore connectivity. Uses
iproute2's ``ip`` and setns(2); needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator

__all__ = ["NamespaceError", "Namespaces", "entered_netns"]


class NamespaceError(RuntimeError):
    """A namespace could not be made, entered or changed (the message says which and why)."""


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise NamespaceError(f"cannot enter a network namespace (setns: {os.strerror(error)})")


@contextlib.contextmanager
def entered_netns(name: str | None) -> Iterator[None]:
    """Run the block in the named network namespace (``/run/netns/NAME``);
    nothing changes for None. Only the calling thread moves (setns(2) on a
    network namespace is per thread), and it moves back on the way out;
    sockets made inside stay in that namespace."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NamespaceError(f"network namespace {name} is gone (`scripts/devnet restart` recreates it)") from None
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


class Namespaces:
    """A network of its own for every node, so that connectivity between
    nodes can really be cut (``partition``) and restored (``heal``).

    Node i lives in the network namespace ``p2pgpu-<tag>-<i>`` with a veth
    interface ``eth0`` at ``10.77.<i // 200>.<i % 200 + 2>/16`` and its own
    loopback (its local API and its stand-in stay on *its* 127.0.0.1). The
    other ends of the veths are ports of a bridge in one more namespace,
    ``p2pgpu-<tag>-hub``, so nothing is added to the machine's own network.
    A partition moves each group's ports onto a bridge of its own: frames
    between groups have no path, exactly as with a cut cable. Nothing is
    reset: connections across the cut stall (and the nodes drop some of them)
    until healed, as across a real network split. Needs root and iproute2's
    ``ip``.
    """

    def __init__(self, tag: str, count: int) -> None:
        self.tag = tag
        self.count = count

    @property
    def hub(self) -> str:
        return f"p2pgpu-{self.tag}-hub"

    def name(self, index: int) -> str:
        return f"p2pgpu-{self.tag}-{index}"

    @staticmethod
    def ip(index: int) -> str:
        return f"10.77.{index // 200}.{index % 200 + 2}"

    @staticmethod
    def check_usable() -> None:
        if shutil.which("ip") is None:
            raise NamespaceError("network namespaces need iproute2's `ip` command")
        if os.geteuid() != 0:
            raise NamespaceError("network namespaces need root")

    @staticmethod
    def _ip(*args: str) -> str:
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise NamespaceError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
        return result.stdout

    def existing(self) -> set[str]:
        return {line.split()[0] for line in self._ip("netns", "list").splitlines() if line.strip()}

    def ensure(self) -> None:
        """Create whatever is missing (idempotent); a re-created node
        namespace joins the main bridge."""
        self.check_usable()
        have = self.existing()
        if self.hub not in have:
            self._ip("netns", "add", self.hub)
            self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.hub, "link", "set", "br0", "up")
        for index in range(self.count):
            name = self.name(index)
            if name in have:
                continue
            self._ip("netns", "add", name)
            self._ip("-n", name, "link", "set", "lo", "up")
            self._ip("link", "add", f"v{index}", "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", name)
            self._ip("-n", name, "addr", "add", f"{self.ip(index)}/16", "dev", "eth0")
            self._ip("-n", name, "link", "set", "eth0", "up")
            self._ip("-n", self.hub, "link", "set", f"v{index}", "master", "br0", "up")

    def destroy(self) -> None:
        """Delete every namespace of this devnet (their interfaces go with them)."""
        if shutil.which("ip") is None:
            return
        have = self.existing()
        for name in [*(self.name(i) for i in range(self.count)), self.hub]:
            if name in have:
                self._ip("netns", "del", name)

    def partition(self, groups: list[list[int]]) -> None:
        """Each group on a bridge of its own; nodes in no group stay together on br0."""
        self.heal()
        for number, group in enumerate(groups, start=1):
            bridge = f"brg{number}"
            self._ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
            self._ip("-n", self.hub, "link", "set", bridge, "up")
            for index in group:
                self._ip("-n", self.hub, "link", "set", f"v{index}", "master", bridge)

    def heal(self) -> None:
        """Every node back on br0; the group bridges removed."""
        for index in range(self.count):
            self._ip("-n", self.hub, "link", "set", f"v{index}", "master", "br0")
        for line in self._ip("-n", self.hub, "-o", "link", "show", "type", "bridge").splitlines():
            bridge = line.split(":")[1].strip().split("@")[0]
            if bridge.startswith("brg"):
                self._ip("-n", self.hub, "link", "del", bridge)
