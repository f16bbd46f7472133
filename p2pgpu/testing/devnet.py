"""A local multi-node network in separate OS processes, on 127.0.0.1.

Used by the integration tests, the benchmarks and ``scripts/devnet``. Every
process it starts is recorded by PID and stopped by that PID (SIGTERM, then
SIGKILL after a deadline); nothing is ever found or killed by name.

Layout under ``root``::

    genesis.json            the network (every node gets coins)
    node0/ node1/ ...       data dirs (node0 holds the faucet key)
    node0.log ...           each node's log
    standin0.log ...        each provider's Ollama stand-in
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from p2pgpu.api import read_api_address
from p2pgpu.api_client import ApiClient
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.datadir import DataDir
from p2pgpu.errors import P2PGPUError

DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b")
COINS_PER_NODE = 1_000


def _stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM by PID, then SIGKILL if it has not exited by ``timeout``."""
    if process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


@dataclass
class StandinProcess:
    """An Ollama stand-in in its own process (``python -m p2pgpu.testing.ollama_standin``)."""

    log_path: Path
    models: tuple[str, ...] = DEFAULT_MODELS
    tokens_per_second: float = 200.0
    parallel: int = 4
    default_length: int = 64  # tokens in a reply that ends on its own
    process: subprocess.Popen | None = None
    host: str | None = None

    def start(self, timeout: float = 30.0) -> str:
        args = [sys.executable, "-m", "p2pgpu.testing.ollama_standin", "--port", "0"]
        args += ["--tokens-per-second", str(self.tokens_per_second), "--parallel", str(self.parallel)]
        args += ["--default-length", str(self.default_length)]
        for model in self.models:
            args += ["--model", model]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the stand-in prints its URL once listening
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if match is None or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"Ollama stand-in did not start (said {line!r}); see {self.log_path}")
        self.host = match.group(1)
        return self.host

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None:
            _stop_process(self.process, timeout)


@dataclass
class NodeProcess:
    """One ``p2pgpu node run`` in its own process."""

    name: str
    data_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        (self.data_dir / "api.addr").unlink(missing_ok=True)
        command = [sys.executable, "-m", "p2pgpu.cli", "--data-dir", str(self.data_dir), "node", "run", *self.args]
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> ApiClient:
        return ApiClient.from_data_dir(DataDir(self.data_dir))

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Wait until the node answers on its local API; returns its status."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode if self.process else '?'}; see {self.log_path}")
            try:
                if read_api_address(DataDir(self.data_dir)) is not None:
                    return self.client().status()
            except (P2PGPUError, OSError) as exc:
                last_error = exc
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s ({last_error}); see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            _stop_process(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL: the crash a provider dying mid-job looks like."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class Devnet:
    """N nodes (the first ``providers`` of them with an Ollama stand-in each)."""

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
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.count = nodes
        self.provider_count = min(providers, nodes)
        self.tokens_per_second = tokens_per_second
        self.heartbeat_s = heartbeat_s
        self.offer_ttl_s = offer_ttl_s
        self.sync_interval_s = sync_interval_s
        self.ollama_host = ollama_host
        self.models = models
        self.reply_tokens = reply_tokens
        self.nodes: list[NodeProcess] = []
        self.standins: list[StandinProcess] = []
        self.genesis_path = self.root / "genesis.json"
        self.peer_ids: list[str] = []

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

    def node_args(self, index: int, bootstrap: list[str], ollama_host: str | None) -> list[str]:
        args = [
            "--genesis", str(self.genesis_path),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--heartbeat", str(self.heartbeat_s),
            "--offer-ttl", str(self.offer_ttl_s),
            "--sync-interval", str(self.sync_interval_s),
        ]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        if ollama_host is not None:
            args += ["--ollama-host", ollama_host, "--offer-cpu"]
        else:
            args += ["--no-provide"]
        return args

    def up(self, timeout: float = 120.0) -> None:
        """Start everything; returns once every node answers on its API."""
        self.make_genesis()
        first_addr: list[str] = []
        for index in range(self.count):
            host = None
            if index < self.provider_count:
                if self.ollama_host:
                    host = self.ollama_host
                else:
                    standin = StandinProcess(self.root / f"standin{index}.log", self.models, self.tokens_per_second,
                                             parallel=8, default_length=self.reply_tokens)
                    host = standin.start()
                    self.standins.append(standin)
            node = NodeProcess(f"node{index}", self.root / f"node{index}", self.root / f"node{index}.log")
            node.args = self.node_args(index, first_addr, host)
            node.start()
            self.nodes.append(node)
            if index == 0:
                status = node.wait_ready(timeout)
                first_addr = [a for a in status["listen_addrs"] if "/127.0.0.1/" in a][:1]
        for node in self.nodes[1:]:
            node.wait_ready(timeout)

    def restart(self, index: int, timeout: float = 60.0) -> dict:
        node = self.nodes[index]
        node.stop()
        node.start()
        return node.wait_ready(timeout)

    def down(self) -> None:
        """Stop every process this devnet started, by PID."""
        for node in self.nodes:
            node.stop()
        for standin in self.standins:
            standin.stop()

    def pids(self) -> list[int]:
        return [p.process.pid for p in [*self.nodes, *self.standins] if p.process is not None]

    def __enter__(self) -> "Devnet":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def statuses(devnet: Devnet) -> list[dict]:
    return [node.client().status() for node in devnet.nodes if node.running]


def dump(devnet: Devnet) -> str:
    return json.dumps(statuses(devnet), indent=2)
