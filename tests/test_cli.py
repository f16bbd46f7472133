"""The ``p2pgpu`` command line: in-process through click's CliRunner, and a
few runs of the real installed console script in a subprocess.

Every run gets its data dir under ``tmp_path`` (``P2PGPU_DATA_DIR`` set, or
``--data-dir`` passed) and a fake ``HOME``/``XDG_DATA_HOME``, so no test can
touch the real home directory.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from click.testing import CliRunner, Result

from p2pgpu import gpu as gpu_module
from p2pgpu.cli import cli
from p2pgpu.core.codec import pack
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.core.hardware import GpuInfo, HardwareReport
from p2pgpu.core.identity import public_key_from_peer_id
from p2pgpu.core.ledger import P_ACCOUNT, P_ENTRY
from p2pgpu.datadir import DataDir
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import START_MS, key_for

alice, bob = key_for("alice"), key_for("bob")


class Cli:
    """Runs ``p2pgpu`` in-process with a private environment."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = DataDir(tmp_path / "node")
        self.tmp = tmp_path
        self.env = {
            "P2PGPU_DATA_DIR": str(self.data_dir.path),
            "HOME": str(tmp_path / "home"),
            "XDG_DATA_HOME": str(tmp_path / "xdg"),
        }
        self.runner = CliRunner(env=self.env)

    def __call__(self, *args: str, ok: bool = True) -> Result:
        result = self.runner.invoke(cli, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, (result.stdout, result.stderr)
        return result

    def fails(self, *args: str) -> Result:
        """Run a command that must fail cleanly: exit 1, one error line, no traceback."""
        result = self(*args, ok=False)
        assert result.exit_code == 1, (result.stdout, result.stderr)
        assert result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
        return result

    def json(self, *args: str) -> dict:
        result = self(*args, "--json")
        return json.loads(result.stdout)


@pytest.fixture
def run(tmp_path) -> Cli:
    return Cli(tmp_path)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def write_genesis(path: Path, genesis: Genesis) -> Path:
    path.write_text(genesis.to_json())
    return path


def two_party_genesis() -> Genesis:
    return Genesis(
        name="clitest",
        created_ms=START_MS,
        faucet=key_for("faucet").public_key,
        allocations=tuple(sorted([(alice.public_key, 5_000_000), (bob.public_key, 1_000_000)])),
        params=LedgerParams(),
    )


# ----------------------------------------------------------------------- init


def test_init_creates_a_private_dir_key_and_token(run):
    result = run("init")
    node = run.data_dir
    assert mode_of(node.path) == 0o700
    assert mode_of(node.key_path) == 0o600
    assert mode_of(node.token_path) == 0o600
    peer_id = node.load_or_create_key(create=False).peer_id
    assert peer_id in result.stdout
    assert str(node.path) in result.stdout
    assert "Created a new node identity" in result.stdout
    assert "none yet" in result.stdout  # no network installed


def test_init_is_umask_independent(run):
    old = os.umask(0)
    try:
        run("init")
    finally:
        os.umask(old)
    assert mode_of(run.data_dir.path) == 0o700
    assert mode_of(run.data_dir.key_path) == 0o600


def test_reinit_keeps_the_same_identity(run):
    first = run.json("init")
    token = run.data_dir.load_or_create_token(create=False)
    second = run.json("init")
    assert first["created"] is True and second["created"] is False
    assert second["peer_id"] == first["peer_id"]
    assert run.data_dir.load_or_create_token(create=False) == token
    assert "already existed" in run("init").stdout


def test_init_installs_a_genesis_and_shows_the_network(run, tmp_path):
    genesis = two_party_genesis()
    path = write_genesis(tmp_path / "g.json", genesis)
    out = run.json("init", "--genesis", str(path))
    assert out["network_id"] == genesis.network_id.hex()
    assert out["genesis_installed"] is True
    assert run.data_dir.genesis() == genesis
    # Idempotent with the same genesis; the human output names the network.
    text = run("init", "--genesis", str(path)).stdout
    assert genesis.network_id.hex() in text and "installed now" not in text


def test_init_refuses_to_switch_networks(run, tmp_path):
    run("init", "--genesis", str(write_genesis(tmp_path / "a.json", two_party_genesis())))
    other = Genesis(name="other", created_ms=START_MS, faucet=bob.public_key)
    result = run.fails("init", "--genesis", str(write_genesis(tmp_path / "b.json", other)))
    assert "already belongs to network" in result.stderr
    assert run.data_dir.genesis() == two_party_genesis()


def test_init_with_a_bad_genesis_file_creates_nothing(run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = run.fails("init", "--genesis", str(bad))
    assert str(bad) in result.stderr
    assert not run.data_dir.path.exists()


def test_data_dir_option_beats_the_environment(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    out = run.json("--data-dir", str(elsewhere), "init")
    assert out["data_dir"] == str(elsewhere)
    assert not run.data_dir.path.exists()
    # Also accepted after the command name.
    assert run.json("id", "--data-dir", str(elsewhere))["peer_id"] == out["peer_id"]


# ------------------------------------------------------------------------- id


def test_id_prints_the_peer_id(run):
    peer_id = run.json("init")["peer_id"]
    assert run("id").stdout == peer_id + "\n"
    out = run.json("id")
    assert out == {
        "peer_id": peer_id,
        "public_key_hex": public_key_from_peer_id(peer_id).hex(),
        "data_dir": str(run.data_dir.path),
    }
    assert json.loads(run("--json", "id").stdout) == out


def test_id_without_a_key_says_run_init(run):
    result = run.fails("id")
    assert "p2pgpu init" in result.stderr
    assert result.stdout == ""
    assert not run.data_dir.path.exists()


def test_key_readable_by_others_is_refused_with_the_chmod_hint(run):
    run("init")
    os.chmod(run.data_dir.key_path, 0o644)
    for command in (["id"], ["init"]):
        result = run.fails(*command)
        assert f"chmod 600 {run.data_dir.key_path}" in result.stderr


def test_malformed_key_is_refused_naming_the_file(run):
    run("init")
    run.data_dir.key_path.write_text("not a key\n")
    result = run.fails("id")
    assert str(run.data_dir.key_path) in result.stderr and "malformed" in result.stderr


# -------------------------------------------------------------------- genesis


def test_genesis_new_then_show_round_trip(run, tmp_path):
    run("init")
    me = run.data_dir.load_or_create_key(create=False)
    out_file = tmp_path / "net.json"
    written = run.json(
        "genesis", "new",
        "--faucet", "self",
        "--alloc", "self=12.5",
        "--alloc", f"{bob.peer_id}=0.000001",
        "--name", "roundtrip",
        "--release-grace", "120",
        "--max-skew", "5",
        "--max-hold", "600",
        "-o", str(out_file),
    )  # fmt: skip
    genesis = Genesis.from_json(out_file.read_text())
    assert written["network_id"] == genesis.network_id.hex()
    assert genesis.name == "roundtrip"
    assert genesis.faucet == me.public_key
    assert dict(genesis.allocations) == {me.public_key: 12_500_000, bob.public_key: 1}
    assert genesis.params == LedgerParams(max_clock_skew_ms=5_000, release_grace_ms=120_000, max_hold_ms=600_000)
    assert genesis.created_ms > START_MS

    shown = run.json("genesis", "show", str(out_file))
    assert shown["name"] == "roundtrip"
    assert shown["network_id"] == genesis.network_id.hex()
    assert shown["faucet"] == me.peer_id
    assert {a["peer_id"]: a["coins"] for a in shown["allocations"]} == {me.peer_id: "12.5", bob.peer_id: "0.000001"}
    assert shown["total_allocated_base_units"] == 12_500_001
    assert shown["params"] == {"max_clock_skew_ms": 5_000, "release_grace_ms": 120_000, "max_hold_ms": 600_000}

    text = run("genesis", "show", str(out_file)).stdout
    for expected in ("roundtrip", genesis.network_id.hex(), me.peer_id, "12.5", "0.000001", "120 s", "5 s"):
        assert expected in text


def test_genesis_new_to_stdout_is_the_genesis_json(run):
    result = run("genesis", "new", "--faucet", alice.peer_id, "--alloc", f"{bob.peer_id}=3")
    genesis = Genesis.from_json(result.stdout)
    assert genesis.faucet == alice.public_key
    assert genesis.allocations == ((bob.public_key, 3_000_000),)
    # Without -o, --json prints the same document (it already is one JSON object).
    as_json = run("genesis", "new", "--faucet", alice.peer_id, "--json").stdout
    assert Genesis.from_json(as_json).faucet == alice.public_key


def test_genesis_show_defaults_to_the_installed_one(run, tmp_path):
    genesis = two_party_genesis()
    run("init", "--genesis", str(write_genesis(tmp_path / "g.json", genesis)))
    shown = run.json("genesis", "show")
    assert shown["network_id"] == genesis.network_id.hex()
    assert shown["total_allocated_coins"] == "6"


def test_genesis_show_without_an_installed_genesis_fails_cleanly(run):
    assert "no genesis installed" in run.fails("genesis", "show").stderr


@pytest.mark.parametrize(
    ("alloc", "message"),
    [
        ("12D3KooWnotapeer=1", "not an ed25519 peer id"),
        ("notbase58!=1", "peer id"),
        (f"{bob.peer_id}=-1", "negative"),
        (f"{bob.peer_id}=1.0000001", "more than 6 decimal places"),
        (f"{bob.peer_id}=0", "more than 0"),
        (f"{bob.peer_id}=1e3", "not a coin amount"),
        (f"{bob.peer_id}=", "PEER_ID=COINS"),
        (f"{bob.peer_id}", "PEER_ID=COINS"),
        ("=5", "PEER_ID=COINS"),
    ],
)
def test_bad_alloc_fails_cleanly_and_writes_nothing(run, tmp_path, alloc, message):
    out_file = tmp_path / "net.json"
    result = run.fails("genesis", "new", "--faucet", alice.peer_id, "--alloc", alloc, "-o", str(out_file))
    assert message in result.stderr
    assert result.stdout == ""
    assert not out_file.exists()


def test_duplicate_alloc_is_refused(run, tmp_path):
    result = run.fails(
        "genesis", "new", "--faucet", alice.peer_id, "--alloc", f"{bob.peer_id}=1", "--alloc", f"{bob.peer_id}=2"
    )
    assert "allocated twice" in result.stderr


def test_self_needs_a_key(run):
    assert "p2pgpu init" in run.fails("genesis", "new", "--faucet", "self").stderr
    assert "p2pgpu init" in run.fails("genesis", "new", "--faucet", alice.peer_id, "--alloc", "self=1").stderr


def test_limits_come_from_the_core_parser(run):
    result = run.fails("genesis", "new", "--faucet", alice.peer_id, "--name", "x" * 65)
    assert "name" in result.stderr and result.stdout == ""


def test_genesis_new_does_not_overwrite_without_force(run, tmp_path):
    out_file = tmp_path / "net.json"
    out_file.write_text("precious")
    assert "--force" in run.fails("genesis", "new", "--faucet", alice.peer_id, "-o", str(out_file)).stderr
    assert out_file.read_text() == "precious"
    run("genesis", "new", "--faucet", alice.peer_id, "-o", str(out_file), "--force")
    assert Genesis.from_json(out_file.read_text()).faucet == alice.public_key


# ----------------------------------------------------------------------- gpus


def test_gpus_without_a_driver(run, monkeypatch):
    report = HardwareReport(gpus=(), nvml_available=False, error="NVIDIA driver is not loaded")
    monkeypatch.setattr(gpu_module, "probe", lambda: report)
    assert run("gpus").stdout == "No NVIDIA GPU: NVIDIA driver is not loaded\n"
    assert run.json("gpus") == {"nvml_available": False, "error": "NVIDIA driver is not loaded", "gpus": []}


def test_gpus_lists_what_the_probe_found(run, monkeypatch):
    gpu = GpuInfo(
        index=0,
        name="NVIDIA H100",
        uuid="GPU-1",
        memory_total_bytes=80 * 1024**3,
        memory_free_bytes=60 * 1024**3,
        utilization_percent=7,
        driver_version="550.1",
        cuda_version="12.4",
        compute_capability=(9, 0),
    )
    monkeypatch.setattr(gpu_module, "probe", lambda: HardwareReport(gpus=(gpu,), nvml_available=True))
    assert "NVIDIA H100" in run("gpus").stdout
    assert run.json("gpus")["gpus"][0]["name"] == "NVIDIA H100"


def test_gpus_with_the_real_probe_prints_json(run):
    out = run.json("gpus")  # whatever this machine has, the output is JSON
    assert isinstance(out["nvml_available"], bool) and isinstance(out["gpus"], list)


# --------------------------------------------------------------------- ledger


def init_with_genesis(run: Cli, tmp_path: Path) -> Genesis:
    genesis = two_party_genesis()
    run("init", "--genesis", str(write_genesis(tmp_path / "g.json", genesis)))
    return genesis


def make_entries(node: DataDir) -> bytes:
    """alice sends bob 1.5 coins and bob takes it in; returns the state hash."""
    book = node.open_ledger()
    try:
        book.send(alice, bob.public_key, 1_500_000, START_MS + 1_000)
        book.receive_all(bob, START_MS + 2_000)
        book.commit()
        return book.state_hash()
    finally:
        book.close()


def test_ledger_verify_on_a_fresh_data_dir(run, tmp_path):
    genesis = init_with_genesis(run, tmp_path)
    out = run.json("ledger", "verify")
    assert out["ok"] is True and out["conservation_ok"] is True
    assert out["entries"] == 0
    assert out["accounts"] == 2
    assert out["minted_base_units"] == out["total_base_units"] == 6_000_000
    assert out["network_id"] == genesis.network_id.hex()
    text = run("ledger", "verify").stdout
    assert "conservation:" in text and "OK" in text


def test_ledger_verify_with_entries(run, tmp_path):
    init_with_genesis(run, tmp_path)
    state_hash = make_entries(run.data_dir)
    out = run.json("ledger", "verify")
    assert out["ok"] is True
    assert out["entries"] == 2
    assert out["bad_signatures"] == 0
    assert out["state_hash"] == out["stored_state_hash"] == state_hash.hex()


def test_ledger_verify_repairs_damaged_derived_state_and_says_so(run, tmp_path):
    init_with_genesis(run, tmp_path)
    state_hash = make_entries(run.data_dir)
    store = LevelDBStore(run.data_dir.ledger_path)
    try:
        record = msgpack.unpackb(store.get(P_ACCOUNT + alice.public_key), raw=False)
        record[0] += 777  # coins out of nowhere
        store.write({P_ACCOUNT + alice.public_key: pack(record)}, sync=True)
    finally:
        store.close()
    result = run("ledger", "verify", "--json", ok=False)
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False
    assert out["conservation_ok"] is False
    assert out["derived_state_consistent"] is False
    assert out["state_hash"] == state_hash.hex()  # rebuilt from the entries
    # The rebuild repaired it: the next check is clean.
    assert run.json("ledger", "verify")["ok"] is True


def test_ledger_verify_finds_a_forged_signature(run, tmp_path):
    init_with_genesis(run, tmp_path)
    make_entries(run.data_dir)
    store = LevelDBStore(run.data_dir.ledger_path)
    try:
        key, wire = next(iter(store.scan(P_ENTRY + alice.public_key)))
        store.write({key: wire[:-1] + bytes([wire[-1] ^ 1])}, sync=True)  # last signature byte
    finally:
        store.close()
    result = run("ledger", "verify", ok=False)
    assert result.exit_code == 1
    assert "BAD SIGNATURE" in result.stdout


def test_ledger_verify_without_genesis_fails_cleanly(run):
    run("init")
    assert "no genesis installed" in run.fails("ledger", "verify").stderr
    assert not run.data_dir.ledger_path.exists()


def test_ledger_verify_on_a_locked_database_fails_cleanly(run, tmp_path):
    init_with_genesis(run, tmp_path)
    holder = LevelDBStore(run.data_dir.ledger_path)  # as a running node would
    try:
        result = run.fails("ledger", "verify")
    finally:
        holder.close()
    assert "another node" in result.stderr
    assert run.json("ledger", "verify")["ok"] is True  # fine once the holder is gone


# ------------------------------------------------------------- JSON everywhere


def test_every_command_prints_one_json_object(run, tmp_path):
    genesis_file = tmp_path / "net.json"
    commands = [
        ["init"],
        ["id"],
        ["genesis", "new", "--faucet", "self", "--alloc", "self=10", "-o", str(genesis_file), "--force"],
        ["genesis", "show", str(genesis_file)],
        ["init", "--genesis", str(genesis_file)],
        ["genesis", "show"],
        ["gpus"],
        ["ledger", "verify"],
    ]
    for command in commands:
        for args in ([*command, "--json"], ["--json", *command]):
            out = json.loads(run(*args).stdout)
            assert isinstance(out, dict), args


def test_help_lists_the_commands(run):
    text = run("--help").stdout
    for name in ("init", "id", "genesis", "gpus", "ledger"):
        assert name in text
    assert "--json" in run("genesis", "new", "--help").stdout


# ------------------------------------------------------ the real console script


def console_script() -> list[str]:
    installed = Path(sys.executable).parent / "p2pgpu"
    if installed.exists():
        return [str(installed)]
    found = shutil.which("p2pgpu")  # pragma: no cover - venv layouts differ
    return [found] if found else [sys.executable, "-m", "p2pgpu.cli"]


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        {
            "P2PGPU_DATA_DIR": str(tmp_path / "node"),
            "HOME": str(tmp_path / "home"),
            "XDG_DATA_HOME": str(tmp_path / "xdg"),
        }
    )
    return subprocess.run([*console_script(), *args], env=env, capture_output=True, text=True, timeout=60)


def test_console_script_end_to_end(tmp_path):
    missing = run_script(tmp_path, "id")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and "p2pgpu init" in missing.stderr
    assert "Traceback" not in missing.stderr

    init = run_script(tmp_path, "init", "--json")
    assert init.returncode == 0, init.stderr
    peer_id = json.loads(init.stdout)["peer_id"]
    assert mode_of(tmp_path / "node" / "node.key") == 0o600
    assert mode_of(tmp_path / "node") == 0o700

    shown = run_script(tmp_path, "id")
    assert shown.returncode == 0 and shown.stdout.strip() == peer_id

    os.chmod(tmp_path / "node" / "node.key", 0o644)
    refused = run_script(tmp_path, "id")
    assert refused.returncode == 1
    assert f"chmod 600 {tmp_path / 'node' / 'node.key'}" in refused.stderr


def test_console_script_reports_a_ledger_held_by_another_process(tmp_path):
    genesis_file = write_genesis(tmp_path / "g.json", two_party_genesis())
    assert run_script(tmp_path, "init", "--genesis", str(genesis_file)).returncode == 0
    holder = LevelDBStore(tmp_path / "node" / "ledger")  # this test process plays the running node
    try:
        locked = run_script(tmp_path, "ledger", "verify")
    finally:
        holder.close()
    assert locked.returncode == 1
    assert locked.stderr.startswith("error: ") and "another node" in locked.stderr
    assert "Traceback" not in locked.stderr
    verified = run_script(tmp_path, "ledger", "verify", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["conservation_ok"] is True


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "p2pgpu.cli", "--data-dir", str(tmp_path / "node"), "init", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data_dir"] == str(tmp_path / "node")
