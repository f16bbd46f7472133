"""The node's data directory: its secrets and its ledger on disk.

An edge: it reads and writes files and holds no rules. Layout::

    <data dir>/            mode 0700 when we create it
        node.key           the node's ed25519 seed: 64 hex characters and a
                           newline, mode 0600. The same key is the libp2p
                           identity and the ledger account (DESIGN §2).
        api.token          bearer token of the local HTTP API (DESIGN §7), as
                           bitcoind's cookie file: 64 hex characters (32
                           random bytes) and a newline, mode 0600.
        genesis.json       this node's copy of its network's genesis.
        ledger/            the LevelDB database of the ledger.
        config.toml        optional settings (read by later versions).

Why hex text rather than the raw 32 bytes: a person can see at a glance that
the file is whole (64 characters), a trailing newline or CRLF from an editor
does no harm, and backups through text tools cannot mangle it.

Secrets are handled the way ssh handles ``~/.ssh/id_*``:

- They are created with ``O_CREAT | O_EXCL`` and mode 0600 passed to
  ``os.open`` (then ``fchmod`` to 0600, so a umask that *adds* bits cannot
  matter), in a temporary file in the same directory, fsynced, then
  hard-linked into place. ``link`` never replaces an existing file, so two
  ``p2pgpu init`` racing each other end up with one key, and a crash never
  leaves a half-written key behind: the file is complete or absent. No file
  is ever written first and chmod'ed later, which would leave a window in
  which others can read it.
- A secret file that other users could read is refused, not fixed: if the
  mode was loosened, the key may already have leaked, and the operator should
  know (the error says the exact ``chmod 600`` to run once they have
  decided). A symlink, anything but a regular file, or a file owned by
  another user is refused too: each is a way for someone else to choose the
  key this node signs with.
"""

from __future__ import annotations

import enum
import errno
import os
import secrets
import shlex
import stat
from collections.abc import Mapping
from pathlib import Path

from p2pgpu.core.genesis import Genesis
from p2pgpu.core.identity import SEED_SIZE, NodeKey
from p2pgpu.core.ledger import Ledger
from p2pgpu.errors import ConfigError, IdentityError, P2PGPUError
from p2pgpu.store import LevelDBStore

ENV_DATA_DIR = "P2PGPU_DATA_DIR"

KEY_FILE = "node.key"
TOKEN_FILE = "api.token"
GENESIS_FILE = "genesis.json"
LEDGER_DIR = "ledger"
CONFIG_FILE = "config.toml"

TOKEN_SIZE = 32
DIR_MODE = 0o700
SECRET_MODE = 0o600
# A genesis is public (it is the network's definition), but it lives in a
# private directory anyway; 0644 lets an operator share it as is.
GENESIS_MODE = 0o644
# Far larger than any valid key or token file: never read an unbounded file
# that someone put in our place.
_MAX_SECRET_FILE = 4096
_MAX_GENESIS_FILE = 4 * 1024 * 1024


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where a node keeps its files unless told otherwise.

    ``$P2PGPU_DATA_DIR`` if set; else ``$XDG_DATA_HOME/p2pgpu``; else
    ``~/.local/share/p2pgpu`` (the XDG default). Empty variables count as
    unset, and a relative ``XDG_DATA_HOME`` is ignored, as the XDG base
    directory spec requires.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_DATA_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "p2pgpu"
    return Path.home() / ".local" / "share" / "p2pgpu"


class GenesisInstall(enum.Enum):
    """What ``DataDir.install_genesis`` did; true unless nothing changed."""

    UNCHANGED = "unchanged"  # the same network was installed already
    INSTALLED = "installed"  # there was none (or ``force`` replaced another network's)
    REPAIRED = "repaired"  # the installed file was unreadable or invalid and was replaced

    def __bool__(self) -> bool:
        return self is not GenesisInstall.UNCHANGED


class DataDir:
    """One node's data directory (see the module docstring for the layout).

    Creating the object touches nothing on disk; ``ensure`` creates the
    directory, ``load_or_create_key(create=True)`` the key. Read-only commands
    (``p2pgpu id``) pass ``create=False`` so that a mistyped ``--data-dir``
    gives an error instead of a new, empty identity.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    @property
    def token_path(self) -> Path:
        return self.path / TOKEN_FILE

    @property
    def genesis_path(self) -> Path:
        return self.path / GENESIS_FILE

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER_DIR

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    # ------------------------------------------------------------ directory

    def ensure(self) -> bool:
        """Create the directory (mode 0700) if needed; True if it was created.

        Parent directories are created with the usual umask-derived modes; only
        the data dir itself must be private. An existing directory's mode is
        left alone (the secret files inside are what is checked).
        """
        try:
            self.path.mkdir(mode=DIR_MODE, parents=True)
        except FileExistsError:
            if not self.path.is_dir():
                raise ConfigError(f"data dir {self.path} exists and is not a directory") from None
            return False
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {self.path}: {exc.strerror or exc}") from exc
        # mkdir's mode is filtered through the umask; make it exactly 0700.
        os.chmod(self.path, DIR_MODE)
        return True

    # -------------------------------------------------------------- secrets

    def has_key(self) -> bool:
        return os.path.lexists(self.key_path)

    def load_or_create_key(self, create: bool) -> NodeKey:
        """The node's key; created (0600) on first use when ``create``.

        Raises ``IdentityError`` when the key is missing and ``create`` is
        False, when the file is open to other users, is a symlink or not a
        regular file, belongs to another user, or does not hold a seed.
        """
        seed = self._load_or_create_secret(self.key_path, "node key", SEED_SIZE, create)
        return NodeKey(seed)

    def load_or_create_token(self, create: bool) -> str:
        """The local API's bearer token as 64 hex characters; created (0600)
        on first use when ``create``. Same checks and errors as the key."""
        return self._load_or_create_secret(self.token_path, "API token", TOKEN_SIZE, create).hex()

    def _load_or_create_secret(self, path: Path, what: str, size: int, create: bool) -> bytes:
        raw = _read_secret(path, what)
        if raw is None:
            if not create:
                raise IdentityError(
                    f"no {what} at {path}; run `p2pgpu init` to create this node's identity"
                    " (or point --data-dir / $P2PGPU_DATA_DIR at an existing data dir)"
                )
            self.ensure()
            value = secrets.token_bytes(size)
            if _create_exclusive(path, value.hex().encode("ascii") + b"\n", SECRET_MODE):
                return value
            # Another process created it between our read and our link: use theirs.
            raw = _read_secret(path, what)
            if raw is None:  # pragma: no cover - it was there a moment ago
                raise IdentityError(f"{what} at {path} disappeared while being created")
        return _parse_hex_secret(raw, path, what, size)

    # -------------------------------------------------------------- genesis

    def has_genesis(self) -> bool:
        return os.path.lexists(self.genesis_path)

    def genesis(self) -> Genesis:
        """The installed genesis; ``ConfigError`` naming the file if it is
        missing, unreadable or invalid."""
        path = self.genesis_path
        try:
            with open(path, "rb") as file:
                raw = file.read(_MAX_GENESIS_FILE + 1)
        except FileNotFoundError:
            raise ConfigError(
                f"no genesis installed in {self.path}; install your network's with "
                "`p2pgpu init --genesis FILE` (make one with `p2pgpu genesis new`)"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot read genesis {path}: {exc.strerror or exc} "
                "(replace it with `p2pgpu init --genesis FILE`, FILE your network's genesis)"
            ) from exc
        try:
            return load_genesis_bytes(raw, path)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (replace it with `p2pgpu init --genesis FILE`, FILE your network's genesis)"
            ) from exc

    def install_genesis(self, genesis: Genesis, *, force: bool = False) -> GenesisInstall:
        """Install ``genesis`` as this node's network; says what it did
        (true if the file changed).

        Installing the same network again is a no-op. A *different* genesis is
        refused unless ``force``: the ledger in this data dir was built for the
        installed network and would refuse to open under another one (its
        entries are signed for the old network id). ``force`` only replaces
        the file; the operator must also move the old ``ledger/`` away.

        An installed file that cannot be read or parsed (a crash, a bad edit)
        names no network, so nothing can be switched by mistake: it is
        replaced atomically (``REPAIRED``, for the caller to report). The
        ledger still checks its own network id when it opens, so a genesis
        of the wrong network is refused there.
        """
        self.ensure()
        damaged = False
        if self.has_genesis():
            try:
                current = self.genesis()
            except ConfigError:
                damaged = True
            else:
                if current.network_id == genesis.network_id:
                    return GenesisInstall.UNCHANGED
                if not force:
                    raise ConfigError(
                        f"{self.path} already belongs to network {current.network_id.hex()} "
                        f"({current.name!r}), not {genesis.network_id.hex()} ({genesis.name!r}); "
                        "its ledger was built for that network. Use another --data-dir for the new network."
                    )
        data = genesis.to_json().encode("utf-8")
        if force or damaged:
            _replace_atomically(self.genesis_path, data, GENESIS_MODE)
        elif not _create_exclusive(self.genesis_path, data, GENESIS_MODE):
            # Someone installed one concurrently; only accept it if it is the same.
            if self.genesis().network_id != genesis.network_id:
                raise ConfigError(f"another genesis was installed in {self.path} at the same time")
            return GenesisInstall.UNCHANGED
        return GenesisInstall.REPAIRED if damaged else GenesisInstall.INSTALLED

    # --------------------------------------------------------------- ledger

    def open_ledger(self) -> Ledger:
        """The ledger in ``ledger/`` under the installed genesis.

        ``ConfigError`` if no genesis is installed, if another process (a
        running node) holds the database, or if the database belongs to
        another network. The caller must ``close()`` the ledger.
        """
        genesis = self.genesis()
        store = LevelDBStore(self.ledger_path)
        try:
            return Ledger(store, genesis)
        except BaseException:
            # Release LevelDB's lock now, not whenever the store is collected.
            store.close()
            raise


def load_genesis_bytes(raw: bytes, path: Path | str) -> Genesis:
    """Parse a genesis file's bytes; ``ConfigError`` that names ``path``."""
    if len(raw) > _MAX_GENESIS_FILE:
        raise ConfigError(f"genesis {path} is larger than {_MAX_GENESIS_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"genesis {path} is not UTF-8 text") from None
    try:
        return Genesis.from_json(text)
    except P2PGPUError as exc:
        raise ConfigError(f"invalid genesis {path}: {exc}") from exc


def read_genesis_file(path: str | os.PathLike[str]) -> Genesis:
    """A genesis from any file (``p2pgpu init --genesis FILE``, ``genesis show FILE``)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_GENESIS_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read genesis {path}: {exc.strerror or exc}") from exc
    return load_genesis_bytes(raw, path)


# ------------------------------------------------------------------ helpers


def _read_secret(path: Path, what: str) -> bytes | None:
    """The bytes of a secret file after every safety check; None if absent.

    The checks are made on the opened descriptor (``fstat``), not on the
    name, so the file that is checked is the file that is read.
    ``O_NOFOLLOW`` refuses a symlink; ``O_NONBLOCK`` keeps a FIFO planted in
    the key's place from hanging the node.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise IdentityError(
                f"{what} {path} is a symbolic link; refusing to use it (replace it with the file itself)"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise IdentityError(f"cannot read {what} {path}: permission denied (is it yours?)") from None
        raise IdentityError(f"cannot open {what} {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(f"{what} {path} is not a regular file; refusing to use it")
        if info.st_uid != os.geteuid():
            raise IdentityError(
                f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); "
                "refusing to use a key someone else controls"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{what} {path} is accessible by other users (mode {mode:04o}); "
                f"if that is unexpected, assume it leaked. Fix the mode with: chmod 600 {shlex.quote(str(path))}"
            )
        raw = os.read(fd, _MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return raw


def _parse_hex_secret(raw: bytes, path: Path, what: str, size: int) -> bytes:
    """The secret in a file of ``2 * size`` hex digits; surrounding
    whitespace (an editor's newline or CRLF) is allowed, nothing else."""
    stripped = raw.strip()
    if len(stripped) != 2 * size:
        raise IdentityError(_malformed(path, what, size))
    try:
        # bytes.fromhex would skip inner spaces; insist on hex digits only.
        if not stripped.isascii() or not stripped.isalnum():
            raise ValueError
        return bytes.fromhex(stripped.decode("ascii"))
    except ValueError:
        raise IdentityError(_malformed(path, what, size)) from None


def _malformed(path: Path, what: str, size: int) -> str:
    # Never echo the content: it may be a secret, just in the wrong shape.
    return (
        f"{what} {path} is malformed: expected {2 * size} hex characters ({size} bytes); "
        "restore it from a backup, or move it away to create a new one"
    )


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new private temp file beside ``path`` and fsync it.

    ``O_EXCL`` + the mode given to ``os.open`` means the file is never
    readable by others, not even for a moment; ``fchmod`` then sets the exact
    mode whatever the umask.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, mode)
    except OSError as exc:
        raise ConfigError(f"cannot create {temp}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(temp)
        raise ConfigError(f"cannot write {temp}: {exc.strerror or exc}") from exc
    os.close(fd)
    return temp


def _create_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` holding ``data`` atomically; False if it already exists.

    Write a temp file, then ``link`` it to the final name: ``link`` fails
    rather than replace an existing file, and readers see either no file or
    the whole file. On a filesystem without hard links, fall back to writing
    the final name directly with ``O_EXCL`` (no clobbering, but a crash
    mid-write could leave it short; the loader then says it is malformed).
    """
    temp = _write_temp(path, data, mode)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from exc
        return _create_direct(path, data, mode)
    finally:
        _unlink_quietly(temp)
    _fsync_dir(path.parent)
    return True


def _create_direct(path: Path, data: bytes, mode: int) -> bool:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return True


def _replace_atomically(path: Path, data: bytes, mode: int) -> None:
    temp = _write_temp(path, data, mode)
    try:
        os.replace(temp, path)
    except OSError as exc:
        _unlink_quietly(temp)
        raise ConfigError(f"cannot replace {path}: {exc.strerror or exc}") from exc
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (a key must survive a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data is written
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
