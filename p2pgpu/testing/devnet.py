"""A local multi-node network in separate OS processes, on 127.0.0.1 (or,
with ``netns=True``, each node in a network namespace of its own).

Used by the integration tests, the benchmarks, ``scripts/demo`` and
``scripts/devnet``. Every process it starts is recorded by PID *and* start
time, and stopped by that PID (SIGTERM, then SIGKILL after a deadline);
nothing is ever found or killed by name, and a PID whose start time no longer
matches (the process ended and the number was reused) is never signalled.

Two ways to use it:

- **In process** (tests, benchmarks, the demo): ``Devnet(root, ...)`` then
  ``up()`` ... ``down()``, or ``with Devnet(...) as net``. The processes are
  children of the caller and share its process group, so a Ctrl-C reaches
  them too.
- **Detached** (``scripts/devnet``): ``Devnet(root, ..., detach=True)``
  starts every process in its own session, so it outlives the command that
  started it; a later command finds it again with ``Devnet.attach(root)``,
  which reads the state file.

Either way the state file ``devnet.json`` is rewritten after every change,
so ``scripts/devnet status --dir ROOT`` can look at a test's network too.

Layout under ``root``::

    devnet.json             the state: settings, names, PIDs + start times, addresses,
                            network namespaces and the current partition
    genesis.json            the network (every node gets coins)
    node0/ node1/ ...       data dirs (node0 holds the faucet key)
    node0.log ...           each node's log
    standin0.log ...        each provider's Ollama stand-in
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pgpu.api import read_api_address
from p2pgpu.gateway.app import GATEWAY_ADDRESS_FILE, read_gateway_address
from p2pgpu.api_client import ApiClient
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.datadir import DataDir
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.netns import Namespaces, entered_netns

__all__ = ["Devnet", "DevnetError", "Namespaces", "NodeProcess", "ProcessRef", "StandinProcess", "entered_netns"]

DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b")
COINS_PER_NODE = 1_000
STATE_FILE = "devnet.json"
STATE_VERSION = 1
_STANDIN_URL = re.compile(r"ollama stand-in listening on (http://127\.0\.0\.1:\d+)")


class DevnetError(Exception):
    """Something about the devnet itself (not the nodes' protocol) went wrong."""


# ------------------------------------------------------------------ processes


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name is in parentheses and may itself hold spaces or ')'
    return text.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process: a zombie (exited, not yet
    reaped) counts as gone."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat``
    field 22); None if there is no such process. With the PID, this names a
    process uniquely: a reused PID has a later start time."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (``VmRSS``), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process this module started, known by PID and start time.

    ``alive`` is false for a zombie (it has exited; only its parent's
    ``wait`` is missing) and for a PID that now belongs to another process.
    Every signal goes through ``signal``, which checks that first.
    """

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        started = process_start_time(pid)
        return cls(pid, started) if started is not None else None

    def alive(self) -> bool:
        fields = _proc_stat(self.pid)
        return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == self.start_time

    def signal(self, signum: int) -> bool:
        """Send ``signum`` if the process is still ours; False if it is gone."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def rss(self) -> int | None:
        return rss_bytes(self.pid) if self.alive() else None


class _Managed:
    """What a node and a stand-in share: a process started by us, either our
    child (``process``) or one found again by PID (``ref``), stopped by PID."""

    process: subprocess.Popen | None
    ref: ProcessRef | None
    detach: bool
    netns: str | None

    def _launch(self, command: list[str], log_path: Path, mode: str) -> None:
        if self.netns is not None:
            # `ip netns exec` execs the command: the PID we record is the command's
            command = ["ip", "netns", "exec", self.netns, *command]
        with open(log_path, mode) as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detach,
            )
        self.ref = ProcessRef.of(self.process.pid)

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return self.ref.pid if self.ref is not None else None

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.ref is not None and self.ref.alive()

    def rss(self) -> int | None:
        pid = self.pid
        return rss_bytes(pid) if pid is not None and self.running else None

    def send_signal(self, signum: int) -> bool:
        if not self.running:
            return False
        if self.process is not None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                return False
            return True
        return self.ref is not None and self.ref.signal(signum)

    def wait_stopped(self, timeout: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return self.ref is None or self.ref.wait_gone(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL if it has not exited by ``timeout``."""
        if self.send_signal(signal.SIGTERM) and not self.wait_stopped(timeout):
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the crash a provider dying mid-job looks like."""
        if self.send_signal(signal.SIGKILL) and not self.wait_stopped(10):
            raise RuntimeError(f"pid {self.pid} did not go away after SIGKILL")

    def _state(self) -> dict[str, Any]:
        ref = self.ref if self.running else None
        return {"pid": ref.pid if ref else None, "start_time": ref.start_time if ref else None}


def stop_all(processes: list[_Managed], timeout: float) -> None:
    """SIGTERM every one at once, wait for all up to ``timeout``, SIGKILL the rest."""
    signalled = [p for p in processes if p.send_signal(signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    for process in signalled:
        if not process.wait_stopped(max(0.0, deadline - time.monotonic())):
            process.kill()


@dataclass(eq=False)
class StandinProcess(_Managed):
    """An Ollama stand-in in its own process (``python -m p2pgpu.testing.ollama_standin``)."""

    log_path: Path
    models: tuple[str, ...] = DEFAULT_MODELS
    tokens_per_second: float = 200.0
    parallel: int = 4
    default_length: int = 64  # tokens in a reply that ends on its own
    process: subprocess.Popen | None = None
    host: str | None = None
    name: str = "standin"
    port: int = 0
    ref: ProcessRef | None = None
    detach: bool = False
    netns: str | None = None  # runs in this network namespace (its node's)

    def start(self, timeout: float = 30.0) -> str:
        """Start it (on ``port``, 0 for a free one); returns its URL once it listens."""
        args = [sys.executable, "-m", "p2pgpu.testing.ollama_standin", "--port", str(self.port)]
        args += ["--tokens-per-second", str(self.tokens_per_second), "--parallel", str(self.parallel)]
        args += ["--default-length", str(self.default_length)]
        for model in self.models:
            args += ["--model", model]
        self._launch(args, self.log_path, "w")
        # it prints its URL once listening; read it from the log, not a pipe,
        # so nothing breaks when a detached stand-in outlives its starter
        deadline = time.monotonic() + timeout
        while True:
            match = _STANDIN_URL.search(self.log_path.read_text(errors="replace"))
            if match is not None:
                self.host = match.group(1)
                self.port = int(self.host.rsplit(":", 1)[1])
                return self.host
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Ollama stand-in did not start; see {self.log_path}")
            time.sleep(0.02)

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name, "log": self.log_path.name, "host": self.host, "port": self.port,
                "models": list(self.models), "netns": self.netns, **self._state()}


@dataclass(eq=False)
class NodeProcess(_Managed):
    """One ``p2pgpu node run`` in its own process."""

    name: str
    data_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    ref: ProcessRef | None = None
    detach: bool = False
    provider: bool = False
    ollama_host: str | None = None
    listen_addr: str | None = None  # the multiaddr (with /p2p/<id>) its peers dial, once it has run
    peer_id: str | None = None
    netns: str | None = None  # runs in this network namespace (see ``Namespaces``)
    ip: str = "127.0.0.1"  # the address it listens on

    def start(self) -> None:
        (self.data_dir / "api.addr").unlink(missing_ok=True)
        (self.data_dir / GATEWAY_ADDRESS_FILE).unlink(missing_ok=True)
        command = [sys.executable, "-m", "p2pgpu.cli", "--data-dir", str(self.data_dir), "node", "run", *self.args]
        self._launch(command, self.log_path, "a")

    def client(self, timeout: float | None = None) -> ApiClient:
        """A client of its local API. For a node in a network namespace, make
        the requests inside ``api()`` instead: its 127.0.0.1 is its own."""
        data_dir = DataDir(self.data_dir)
        return ApiClient.from_data_dir(data_dir) if timeout is None else ApiClient.from_data_dir(data_dir, timeout=timeout)

    @contextlib.contextmanager
    def api(self, timeout: float | None = None) -> Iterator[ApiClient]:
        """A client of its local API, usable inside the block (which runs in
        the node's network namespace when it has one)."""
        with entered_netns(self.netns), self.client(timeout) as client:
            yield client

    def wait_ready(self, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> dict:
        """Wait until the node answers on its local API; returns its status.
        ``progress`` hears every 10 s that it is still waiting."""
        started = time.monotonic()
        deadline = started + timeout
        told = started
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if progress is not None and time.monotonic() - told >= 10.0:
                told = time.monotonic()
                progress(f"{self.name}: still waiting for its local API ({told - started:.0f} s)")
            if not self.running:
                code = self.process.returncode if self.process is not None else "?"
                raise RuntimeError(f"{self.name} exited with {code}; see {self.log_path}")
            try:
                if read_api_address(DataDir(self.data_dir)) is not None:
                    with self.api() as client:
                        status = client.status()
                    self._remember(status)
                    return status
            except (P2PGPUError, OSError) as exc:
                last_error = exc
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s ({last_error}); see {self.log_path}")

    def gateway_url(self) -> str | None:
        """Its Ollama/OpenAI gateway (``http://127.0.0.1:PORT``), once it runs
        (in the node's network namespace when it has one)."""
        return read_gateway_address(DataDir(self.data_dir))

    def _remember(self, status: dict) -> None:
        self.peer_id = status.get("peer_id") or self.peer_id
        mine = [a for a in status.get("listen_addrs") or [] if f"/{self.ip}/" in a]
        if mine:
            self.listen_addr = mine[0]

    @property
    def listen_port(self) -> int | None:
        match = re.search(r"/tcp/(\d+)", self.listen_addr or "")
        return int(match.group(1)) if match else None

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name, "data_dir": self.data_dir.name, "log": self.log_path.name, "args": self.args,
                "provider": self.provider, "ollama_host": self.ollama_host, "listen_addr": self.listen_addr,
                "peer_id": self.peer_id, "netns": self.netns, "ip": self.ip, **self._state()}


# ---------------------------------------------------------------- the network


class Devnet:
    """N nodes (the first ``providers`` of them with an Ollama stand-in each).

    ``slots`` is what each provider advertises (the node's own default when
    None); ``ollama_host`` makes every provider use that Ollama instead of a
    stand-in of its own. ``netns`` puts every node (and its stand-in) in a
    network namespace of its own (see ``Namespaces``), which ``partition``
    and ``heal`` need; the local APIs are then reached through
    ``NodeProcess.api()``.
    """

    def __init__(
        self,
        root: Path,
        nodes: int,
        providers: int = 1,
        *,
        tokens_per_second: float = 200.0,
        heartbeat_s: float = 1.0,
        offer_ttl_s: float = 3.0,
        sync_interval_s: float = 2.0,
        ollama_host: str | None = None,
        models: tuple[str, ...] = DEFAULT_MODELS,
        reply_tokens: int = 64,
        slots: int | None = None,
        detach: bool = False,
        netns: bool = False,
    ) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.count = nodes
        self.provider_count = min(providers, nodes)
        self.tokens_per_second = tokens_per_second
        self.heartbeat_s = heartbeat_s
        self.offer_ttl_s = offer_ttl_s
        self.sync_interval_s = sync_interval_s
        self.ollama_host = ollama_host
        self.models = tuple(models)
        self.reply_tokens = reply_tokens
        self.slots = slots
        self.detach = detach
        # one network namespace per node (needs root): what `partition` cuts
        self.namespaces = Namespaces(hashlib.sha256(str(self.root).encode()).hexdigest()[:8], nodes) if netns else None
        self.partitioned: list[list[str]] | None = None
        self.nodes: list[NodeProcess] = []
        self.standins: list[StandinProcess] = []
        self.genesis_path = self.root / "genesis.json"
        self.state_path = self.root / STATE_FILE
        self.peer_ids: list[str] = []
        self.created_ms = int(time.time() * 1000)

    # ---------------------------------------------------------------- setup

    def make_genesis(self) -> Genesis:
        """Keys for every node, node 0 as faucet, coins for everyone."""
        keys = []
        for index in range(self.count):
            data_dir = DataDir(self.root / f"node{index}")
            data_dir.ensure()
            keys.append(data_dir.load_or_create_key(create=True))
        self.peer_ids = [k.peer_id for k in keys]
        genesis = Genesis(
            name=f"devnet-{self.root.name}",
            created_ms=int(time.time() * 1000),
            faucet=keys[0].public_key,
            allocations=tuple(sorted((k.public_key, COINS_PER_NODE * 1_000_000) for k in keys)),
            params=LedgerParams(max_clock_skew_ms=60_000, release_grace_ms=60_000, max_hold_ms=3_600_000),
        )
        self.genesis_path.write_text(genesis.to_json())
        return genesis

    def genesis(self) -> Genesis:
        return Genesis.from_json(self.genesis_path.read_text())

    def node_args(self, index: int, bootstrap: list[str], ollama_host: str | None,
                  listen: str | None = None) -> list[str]:
        listen = listen or f"/ip4/{self._ip(index)}/tcp/0"
        args = [
            "--genesis", str(self.genesis_path),
            "--listen", listen,
            "--heartbeat", str(self.heartbeat_s),
            "--offer-ttl", str(self.offer_ttl_s),
            "--sync-interval", str(self.sync_interval_s),
            "--gateway-listen", "127.0.0.1:0",  # one default port per machine: each node takes a free one
        ]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        if ollama_host is not None:
            args += ["--ollama-host", ollama_host, "--offer-cpu"]
            if self.slots is not None:
                args += ["--slots", str(self.slots)]
        else:
            args += ["--no-provide"]
        return args

    def _ip(self, index: int) -> str:
        return self.namespaces.ip(index) if self.namespaces else "127.0.0.1"

    def _netns(self, index: int) -> str | None:
        return self.namespaces.name(index) if self.namespaces else None

    def up(self, timeout: float = 120.0, progress: Callable[[str], None] | None = None) -> None:
        """Start everything; returns once every node answers on its API.

        ``progress``, when given, hears a line as each process starts and
        as each node answers, with the seconds since the start (what
        ``scripts/devnet up`` prints on stderr).

        On failure, what was started keeps running (call ``down``); the
        state file lists it either way.
        """
        began = time.monotonic()

        def tell(what: str) -> None:
            if progress is not None:
                progress(f"[{time.monotonic() - began:5.1f} s] {what}")

        if self.namespaces is not None:
            if self.ollama_host:
                raise DevnetError("nodes in network namespaces cannot reach an Ollama outside; use stand-ins")
            self.namespaces.ensure()
        self.make_genesis()
        self.save()
        first_addr: list[str] = []
        parallel = max(8, self.slots or 1)
        for index in range(self.count):
            host = None
            if index < self.provider_count:
                if self.ollama_host:
                    host = self.ollama_host
                else:
                    standin = StandinProcess(self.root / f"standin{index}.log", self.models, self.tokens_per_second,
                                             parallel=parallel, default_length=self.reply_tokens,
                                             name=f"standin{index}", detach=self.detach,
                                             netns=self._netns(index))
                    self.standins.append(standin)
                    host = standin.start()
                    tell(f"{standin.name} (Ollama stand-in) listening at {host}, pid {standin.pid}")
            node = NodeProcess(f"node{index}", self.root / f"node{index}", self.root / f"node{index}.log",
                               detach=self.detach, provider=host is not None, ollama_host=host,
                               peer_id=self.peer_ids[index], netns=self._netns(index), ip=self._ip(index))
            node.args = self.node_args(index, first_addr, host)
            self.nodes.append(node)
            node.start()
            self.save()
            tell(f"{node.name} started, pid {node.pid}" + (" (the others bootstrap to it)" if index == 0 else ""))
            if index == 0:
                node.wait_ready(timeout, tell)
                tell(f"{node.name} ready (answers on its local API)")
                first_addr = [node.listen_addr] if node.listen_addr else []
        for node in self.nodes[1:]:
            node.wait_ready(timeout, tell)
            tell(f"{node.name} ready (answers on its local API)")
        self.save()

    # ------------------------------------------------------------- changes

    def node(self, name: str | int) -> NodeProcess:
        """A node by index, ``node3`` or ``3``; ``DevnetError`` naming the choices."""
        for index, node in enumerate(self.nodes):
            if str(name) in (node.name, str(index)):
                return node
        raise DevnetError(f"no node named {name!r} in this devnet (nodes: {self._names(self.nodes)})")

    def process(self, name: str) -> NodeProcess | StandinProcess:
        """A node or a stand-in by name."""
        for standin in self.standins:
            if name == standin.name:
                return standin
        try:
            return self.node(name)
        except DevnetError:
            raise DevnetError(
                f"no node or stand-in named {name!r} in this devnet "
                f"(nodes: {self._names(self.nodes)}; stand-ins: {self._names(self.standins) or 'none'})"
            ) from None

    @staticmethod
    def _names(items: list) -> str:
        names = [item.name for item in items]
        return ", ".join(names) if len(names) <= 6 else f"{names[0]} .. {names[-1]}"

    def restart(self, index: int | str, timeout: float = 60.0) -> dict:
        """Stop the node (if running) and start it again with the same data
        dir, on the same port when that is free (so its peers' bootstrap
        addresses stay right), bootstrapping to up to three running nodes."""
        node = self.node(index)
        node.stop()
        position = self.nodes.index(node)
        if self.namespaces is not None:
            self.namespaces.ensure()
        standin = next((s for s in self.standins if s.name == f"standin{position}"), None)
        if standin is not None and not standin.running:
            self.restart_standin(standin.name)  # same port: the node's --ollama-host stays right
        others = [n for n in self.nodes if n is not node and n.running and n.listen_addr]
        others.sort(key=lambda n: self.nodes.index(n))
        bootstrap = [n.listen_addr for n in others[:3] if n.listen_addr]
        if not bootstrap and position != 0 and self.nodes[0].listen_addr:
            bootstrap = [self.nodes[0].listen_addr]
        listens = [f"/ip4/{node.ip}/tcp/0"]
        if node.listen_port:
            listens.insert(0, f"/ip4/{node.ip}/tcp/{node.listen_port}")
        for attempt, listen in enumerate(listens):
            node.args = self.node_args(position, bootstrap, node.ollama_host, listen)
            node.start()
            self.save()
            try:
                status = node.wait_ready(timeout)
            except RuntimeError:
                if node.running or attempt == len(listens) - 1:
                    raise
                continue  # the old port was taken meanwhile: any port will do
            self.save()
            return status
        raise AssertionError("unreachable")

    def restart_standin(self, name: str, timeout: float = 30.0) -> str:
        """Start a stand-in again on its old port (its node's --ollama-host)."""
        standin = self.process(name)
        assert isinstance(standin, StandinProcess)
        standin.stop()
        if self.namespaces is not None:
            self.namespaces.ensure()
        host = standin.start(timeout)
        self.save()
        return host

    def kill(self, name: str) -> bool:
        """SIGKILL one node or stand-in by its recorded PID; False if it was not running."""
        target = self.process(name)
        was_running = target.running
        target.kill()
        self.save()
        return was_running

    def down(self, timeout: float = 10.0) -> None:
        """Stop every process this devnet started, by PID: the nodes first
        (SIGTERM lets providers withdraw their offers), then the stand-ins."""
        try:
            stop_all(list(self.nodes), timeout)
            stop_all(list(self.standins), 5.0)
            if self.namespaces is not None and not self.running():
                self.namespaces.destroy()
                self.partitioned = None
        finally:
            if self.state_path.parent.is_dir():
                self.save()

    def partition(self, groups: list[list[str]]) -> None:
        """Cut the network between groups of nodes (names); nodes named in
        no group stay connected to each other. Needs ``netns``."""
        if self.namespaces is None:
            raise DevnetError("partition needs a devnet started with --netns (each node in its own network)")
        indices = [[self.nodes.index(self.node(name)) for name in group] for group in groups]
        flat = [i for group in indices for i in group]
        if len(flat) != len(set(flat)):
            raise DevnetError("a node can be in one group only")
        self.namespaces.partition(indices)
        self.partitioned = [[self.nodes[i].name for i in group] for group in indices]
        self.save()

    def heal(self) -> None:
        if self.namespaces is None:
            raise DevnetError("heal needs a devnet started with --netns (each node in its own network)")
        self.namespaces.heal()
        self.partitioned = None
        self.save()

    def pids(self) -> list[int]:
        return [p.pid for p in [*self.nodes, *self.standins] if p.pid is not None]

    def running(self) -> list[NodeProcess | StandinProcess]:
        return [p for p in [*self.nodes, *self.standins] if p.running]

    def __enter__(self) -> "Devnet":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # --------------------------------------------------------------- state

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "created_ms": self.created_ms,
            "settings": {
                "nodes": self.count, "providers": self.provider_count, "tokens_per_second": self.tokens_per_second,
                "heartbeat_s": self.heartbeat_s, "offer_ttl_s": self.offer_ttl_s,
                "sync_interval_s": self.sync_interval_s, "ollama_host": self.ollama_host,
                "models": list(self.models), "reply_tokens": self.reply_tokens, "slots": self.slots,
                "detach": self.detach, "netns": self.namespaces is not None,
            },
            "partition": self.partitioned,
            "genesis": self.genesis_path.name,
            "peer_ids": self.peer_ids,
            "nodes": [node.to_state() for node in self.nodes],
            "standins": [standin.to_state() for standin in self.standins],
        }

    def save(self) -> None:
        """Write the state file atomically (a reader never sees half of it)."""
        temp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(self.to_state(), indent=2) + "\n")
        os.replace(temp, self.state_path)

    @classmethod
    def attach(cls, root: Path) -> "Devnet":
        """The devnet whose state file is in ``root``, its processes found
        again by PID and start time (those that died show as not running).
        ``DevnetError`` when there is none or the file is not ours."""
        root = Path(root).absolute()
        path = root / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise DevnetError(f"no devnet in {root} (no {STATE_FILE}); start one with `scripts/devnet up`") from None
        except (OSError, ValueError) as exc:
            raise DevnetError(f"cannot read {path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DevnetError(f"{path} is not a devnet state file this version understands")
        settings = state["settings"]
        net = cls(
            root, settings["nodes"], settings["providers"], tokens_per_second=settings["tokens_per_second"],
            heartbeat_s=settings["heartbeat_s"], offer_ttl_s=settings["offer_ttl_s"],
            sync_interval_s=settings["sync_interval_s"], ollama_host=settings["ollama_host"],
            models=tuple(settings["models"]), reply_tokens=settings["reply_tokens"], slots=settings["slots"],
            detach=settings.get("detach", True), netns=settings.get("netns", False),
        )
        net.partitioned = state.get("partition")
        net.created_ms = state["created_ms"]
        net.genesis_path = root / state["genesis"]
        net.peer_ids = list(state["peer_ids"])
        for item in state["nodes"]:
            net.nodes.append(NodeProcess(
                item["name"], root / item["data_dir"], root / item["log"], list(item["args"]),
                ref=_ref(item), detach=net.detach, provider=item["provider"], ollama_host=item["ollama_host"],
                listen_addr=item["listen_addr"], peer_id=item["peer_id"], netns=item.get("netns"),
                ip=item.get("ip", "127.0.0.1"),
            ))
        for item in state["standins"]:
            net.standins.append(StandinProcess(
                root / item["log"], tuple(item["models"]), net.tokens_per_second, parallel=max(8, net.slots or 1),
                default_length=net.reply_tokens, host=item["host"], name=item["name"], port=item["port"] or 0,
                ref=_ref(item), detach=net.detach, netns=item.get("netns"),
            ))
        return net


def _ref(item: dict[str, Any]) -> ProcessRef | None:
    if item.get("pid") is None or item.get("start_time") is None:
        return None
    return ProcessRef(int(item["pid"]), int(item["start_time"]))


def statuses(devnet: Devnet) -> list[dict]:
    answers = []
    for node in devnet.nodes:
        if node.running:
            with node.api() as client:
                answers.append(client.status())
    return answers


def dump(devnet: Devnet) -> str:
    return json.dumps(statuses(devnet), indent=2)
