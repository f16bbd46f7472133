"""The data dir edge: where it is, how secrets are created, what is refused.

Every test works under ``tmp_path``; nothing here reads or writes the real
home directory (``default_data_dir`` is tested with explicit mappings and a
patched ``HOME``).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from p2pgpu import datadir as datadir_module
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.datadir import DataDir, GenesisInstall, default_data_dir, read_genesis_file
from p2pgpu.errors import ConfigError, IdentityError
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import key_for, make_genesis


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def umask(request):
    """Run the test under a given umask: modes must not depend on it."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture
def node_dir(tmp_path) -> DataDir:
    return DataDir(tmp_path / "node")


# ------------------------------------------------------------ default location


def test_default_data_dir_prefers_the_explicit_variable(tmp_path):
    env = {"P2PGPU_DATA_DIR": str(tmp_path / "explicit"), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert default_data_dir(env) == tmp_path / "explicit"


def test_default_data_dir_uses_xdg_data_home(tmp_path):
    assert default_data_dir({"XDG_DATA_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "p2pgpu"


def test_default_data_dir_falls_back_to_local_share(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir({}) == tmp_path / ".local" / "share" / "p2pgpu"
    # Empty variables count as unset; a relative XDG_DATA_HOME is ignored (XDG spec).
    assert default_data_dir({"P2PGPU_DATA_DIR": "", "XDG_DATA_HOME": "relative/dir"}) == (
        tmp_path / ".local" / "share" / "p2pgpu"
    )


def test_default_data_dir_reads_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("P2PGPU_DATA_DIR", str(tmp_path / "from-env"))
    assert default_data_dir() == tmp_path / "from-env"


# ------------------------------------------------------------------ directory


def test_ensure_creates_a_private_directory_whatever_the_umask(node_dir, umask):
    assert node_dir.ensure() is True
    assert mode_of(node_dir.path) == 0o700
    assert node_dir.ensure() is False  # idempotent


def test_ensure_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "node").write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        DataDir(tmp_path / "node").ensure()


def test_creating_the_object_touches_nothing(tmp_path):
    DataDir(tmp_path / "node")
    assert not (tmp_path / "node").exists()


# ------------------------------------------------------------------------ key


def test_key_is_created_0600_as_hex_and_reloaded(node_dir, umask):
    key = node_dir.load_or_create_key(create=True)
    assert mode_of(node_dir.path) == 0o700
    assert mode_of(node_dir.key_path) == 0o600
    text = node_dir.key_path.read_text()
    assert text == key.seed.hex() + "\n"
    again = node_dir.load_or_create_key(create=False)
    assert again.peer_id == key.peer_id
    assert node_dir.load_or_create_key(create=True).peer_id == key.peer_id
    # No temporary file is left behind.
    assert sorted(p.name for p in node_dir.path.iterdir()) == ["node.key"]


def test_missing_key_without_create_says_run_init(node_dir):
    with pytest.raises(IdentityError, match="p2pgpu init") as info:
        node_dir.load_or_create_key(create=False)
    assert str(node_dir.key_path) in str(info.value)
    assert not node_dir.path.exists()  # a read never creates the data dir


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o666])
def test_key_open_to_others_is_refused_with_the_chmod_fix(node_dir, mode):
    node_dir.load_or_create_key(create=True)
    os.chmod(node_dir.key_path, mode)
    with pytest.raises(IdentityError) as info:
        node_dir.load_or_create_key(create=True)
    message = str(info.value)
    assert f"chmod 600 {node_dir.key_path}" in message
    assert f"{mode:04o}" in message
    assert mode_of(node_dir.key_path) == mode  # reported, never silently "fixed"


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_key_with_owner_only_modes_is_accepted(node_dir, mode):
    key = node_dir.load_or_create_key(create=True)
    os.chmod(node_dir.key_path, mode)
    assert node_dir.load_or_create_key(create=False).peer_id == key.peer_id


def test_chmod_hint_quotes_awkward_paths(tmp_path):
    node = DataDir(tmp_path / "my node")
    node.load_or_create_key(create=True)
    os.chmod(node.key_path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600 '"):
        node.load_or_create_key(create=False)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"ab" * 31 + b"\n",  # 31 bytes
        b"ab" * 33 + b"\n",  # 33 bytes
        b"zz" * 32 + b"\n",  # not hex
        b"ab" * 16 + b" " + b"ab" * 15 + b"a\n",  # inner whitespace
        bytes(range(32)),  # the raw seed: we store hex, so this is refused
        b"\xff" * 64,
        b"ab" * 5000,
    ],
)
def test_malformed_key_is_refused_naming_the_file(node_dir, content):
    node_dir.ensure()
    fd = os.open(node_dir.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(IdentityError, match="malformed") as info:
        node_dir.load_or_create_key(create=True)
    assert str(node_dir.key_path) in str(info.value)
    assert node_dir.key_path.read_bytes() == content  # never "repaired" by overwriting


def test_key_tolerates_crlf(node_dir):
    key = node_dir.load_or_create_key(create=True)
    os.chmod(node_dir.key_path, 0o600)
    node_dir.key_path.write_text(key.seed.hex().upper() + "\r\n")
    assert node_dir.load_or_create_key(create=False).peer_id == key.peer_id


def test_key_symlink_is_refused(node_dir, tmp_path):
    node_dir.ensure()
    target = tmp_path / "elsewhere.key"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"ab" * 32 + b"\n")
    os.close(fd)
    node_dir.key_path.symlink_to(target)
    with pytest.raises(IdentityError, match="symbolic link"):
        node_dir.load_or_create_key(create=True)


def test_dangling_key_symlink_is_refused_not_followed(node_dir, tmp_path):
    node_dir.ensure()
    target = tmp_path / "would-be-created.key"
    node_dir.key_path.symlink_to(target)
    with pytest.raises(IdentityError):
        node_dir.load_or_create_key(create=True)
    assert not target.exists()


def test_key_that_is_a_directory_is_refused(node_dir):
    node_dir.ensure()
    node_dir.key_path.mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="not a regular file"):
        node_dir.load_or_create_key(create=True)


def test_key_that_is_a_fifo_is_refused_without_blocking(node_dir):
    node_dir.ensure()
    os.mkfifo(node_dir.key_path, 0o600)
    with pytest.raises(IdentityError, match="not a regular file"):
        node_dir.load_or_create_key(create=True)


def test_key_owned_by_someone_else_is_refused(node_dir, monkeypatch):
    node_dir.load_or_create_key(create=True)
    real = os.geteuid()
    monkeypatch.setattr(datadir_module.os, "geteuid", lambda: real + 1)
    with pytest.raises(IdentityError, match="belongs to uid"):
        node_dir.load_or_create_key(create=False)


def test_racing_creators_agree_on_one_key(node_dir):
    peer_ids: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        try:
            peer_ids.append(node_dir.load_or_create_key(create=True).peer_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(peer_ids)) == 1
    assert node_dir.load_or_create_key(create=False).peer_id == peer_ids[0]
    assert sorted(p.name for p in node_dir.path.iterdir()) == ["node.key"]


def test_losing_the_link_race_reads_the_winner(node_dir, monkeypatch):
    """Another process creates the key between our read and our link."""
    winner = key_for("alice")
    real_link = os.link

    def link_after_rival(src, dst, *args, **kwargs):
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner.seed.hex().encode() + b"\n")
        os.close(fd)
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(datadir_module.os, "link", link_after_rival)
    assert node_dir.load_or_create_key(create=True).peer_id == winner.peer_id
    assert sorted(p.name for p in node_dir.path.iterdir()) == ["node.key"]


def test_filesystems_without_hard_links_still_get_an_exclusive_0600_key(node_dir, monkeypatch, umask):
    def no_links(src, dst, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(datadir_module.os, "link", no_links)
    key = node_dir.load_or_create_key(create=True)
    assert mode_of(node_dir.key_path) == 0o600
    assert node_dir.load_or_create_key(create=False).peer_id == key.peer_id
    assert sorted(p.name for p in node_dir.path.iterdir()) == ["node.key"]


# ---------------------------------------------------------------------- token


def test_token_is_created_0600_and_stable(node_dir, umask):
    token = node_dir.load_or_create_token(create=True)
    assert len(token) == 64 and bytes.fromhex(token)
    assert mode_of(node_dir.token_path) == 0o600
    assert node_dir.token_path.read_text() == token + "\n"
    assert node_dir.load_or_create_token(create=False) == token
    key = node_dir.load_or_create_key(create=True)
    assert key.seed.hex() != token


def test_token_gets_the_same_checks_as_the_key(node_dir):
    with pytest.raises(IdentityError, match="p2pgpu init"):
        node_dir.load_or_create_token(create=False)
    node_dir.load_or_create_token(create=True)
    os.chmod(node_dir.token_path, 0o644)
    with pytest.raises(IdentityError, match=f"chmod 600 {node_dir.token_path}"):
        node_dir.load_or_create_token(create=False)
    os.chmod(node_dir.token_path, 0o600)
    node_dir.token_path.write_text("short\n")
    with pytest.raises(IdentityError, match="API token .* is malformed"):
        node_dir.load_or_create_token(create=False)


# -------------------------------------------------------------------- genesis


def other_genesis() -> Genesis:
    return make_genesis(name="othernet")


def test_missing_genesis_says_how_to_install_one(node_dir):
    with pytest.raises(ConfigError, match="p2pgpu init --genesis"):
        node_dir.genesis()


def test_install_and_load_genesis(node_dir):
    genesis = make_genesis()
    assert node_dir.install_genesis(genesis) is GenesisInstall.INSTALLED
    assert node_dir.genesis() == genesis
    assert node_dir.install_genesis(genesis) is GenesisInstall.UNCHANGED  # same network: no-op
    assert not GenesisInstall.UNCHANGED and GenesisInstall.INSTALLED and GenesisInstall.REPAIRED
    assert mode_of(node_dir.path) == 0o700


def test_a_different_genesis_is_refused_unless_forced(node_dir):
    node_dir.install_genesis(make_genesis())
    with pytest.raises(ConfigError, match="already belongs to network"):
        node_dir.install_genesis(other_genesis())
    assert node_dir.genesis() == make_genesis()
    assert node_dir.install_genesis(other_genesis(), force=True) is GenesisInstall.INSTALLED
    assert node_dir.genesis() == other_genesis()
    assert sorted(p.name for p in node_dir.path.iterdir()) == ["genesis.json"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 99}', "\udcff"])
def test_invalid_genesis_errors_name_the_file(node_dir, content):
    node_dir.ensure()
    node_dir.genesis_path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as info:
        node_dir.genesis()
    assert str(node_dir.genesis_path) in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b'{"version": 99}'])
def test_a_damaged_installed_genesis_is_replaced_and_reported(node_dir, content):
    """A genesis that cannot be read names no network, so installing a valid
    one repairs it (atomically: no temp file is left) rather than refuse."""
    node_dir.ensure()
    node_dir.genesis_path.write_bytes(content)
    assert node_dir.install_genesis(make_genesis()) is GenesisInstall.REPAIRED
    assert node_dir.genesis() == make_genesis()
    assert mode_of(node_dir.genesis_path) == 0o644
    assert sorted(p.name for p in node_dir.path.iterdir()) == ["genesis.json"]
    # Once valid, another network is refused again.
    with pytest.raises(ConfigError, match="already belongs to network"):
        node_dir.install_genesis(other_genesis())


def test_read_genesis_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read genesis"):
        read_genesis_file(tmp_path / "absent.json")
    path = tmp_path / "g.json"
    genesis = make_genesis(params=LedgerParams(max_clock_skew_ms=1_000))
    path.write_text(genesis.to_json())
    assert read_genesis_file(path) == genesis


# --------------------------------------------------------------------- ledger


def test_open_ledger_needs_a_genesis(node_dir):
    with pytest.raises(ConfigError, match="no genesis installed"):
        node_dir.open_ledger()
    assert not node_dir.ledger_path.exists()


def test_open_ledger_reports_a_locked_database(node_dir):
    node_dir.install_genesis(make_genesis())
    holder = LevelDBStore(node_dir.ledger_path)
    try:
        with pytest.raises(ConfigError, match="another node"):
            node_dir.open_ledger()
    finally:
        holder.close()


def test_open_ledger_releases_the_lock_when_the_network_differs(node_dir):
    node_dir.install_genesis(make_genesis())
    node_dir.open_ledger().close()
    node_dir.install_genesis(other_genesis(), force=True)
    with pytest.raises(ConfigError, match="belongs to network"):
        node_dir.open_ledger()
    # The failed open must not keep LevelDB's lock in this process.
    LevelDBStore(node_dir.ledger_path).close()
