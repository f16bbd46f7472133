"""The ``p2pgpu`` command line (click).

Thin by design, like httpx's CLI: each command parses its arguments, calls the
package, and prints what comes back. Errors are turned into output in exactly
one place, ``_RootGroup`` (``_as_failure``): any ``P2PGPUError`` becomes
``error: <message>`` on one line of stderr, so every command fails the same
way and none needs its own try/except. With ``--json`` anywhere on the
command line, any error (click's usage errors too) is instead one JSON
object on stderr: ``{"error": {"code": "<snake_case kind>", "message": "...",
"exit_code": N}}``; ``code`` is the error class's name in snake_case
(``config_error``, ``node_not_running``, ``address_in_use``...), or
``usage_error`` / ``interrupted``. trio wraps what fails inside a nursery in
exception groups, several layers deep; a group whose leaves are all
``P2PGPUError`` is reported as its first leaf. Anything else escaping is a
bug and keeps its traceback.

Exit statuses:

====  ==========================================================
0     success
1     an error the user must fix (the message says what)
2     usage error: a bad option or a missing argument (click's)
3     the command needs the running node, and it is not running
130   interrupted: Ctrl-C (SIGINT). ``node run`` stopped by SIGINT
      first shuts down cleanly; stopped by SIGTERM it exits 0
====  ==========================================================

Output is for people by default; ``--json`` prints one JSON object on stdout
instead. ``--json`` and ``--data-dir`` are accepted both before and after the
command name (``p2pgpu --json id`` and ``p2pgpu id --json``): the options sit
on the root group and on every command, and the last one given wins.

Adding a command
----------------
Decorate it with ``@cli.command()`` (or a subgroup's ``.command()``) and
``@_with_settings``; it receives a frozen ``Settings`` (data dir, json) first.
Build the answer as one dict plus a human rendering and hand both to
``_emit``. Raise a ``P2PGPUError`` subclass for anything the user must fix.
Most commands work on local files only (identity, genesis, the offline
ledger check, the GPU probe). Those that need the running node (``status``,
``peers``, ``offers``, ``wallet``, ``send``, ``faucet``, ``submit``, ``jobs``,
``job show|cancel``) are thin clients of its local HTTP API (DESIGN §7): open one
with ``with _node(settings) as node:`` and call ``p2pgpu.api_client``'s
``ApiClient``, which reads ``api.addr`` and ``api.token`` from the data dir
and already turns every HTTP failure into a ``P2PGPUError`` (``NodeNotRunning``
when nothing listens), so these commands need no error handling either.
With ``--json`` they print the API's JSON unchanged. Strings that came from
other peers (memos, model names, addresses) go through ``_safe`` before they
reach a terminal (``_safe_text`` for generated text, which keeps its line
breaks). ``submit`` streams: with ``--json`` it prints one JSON line per event
rather than one object.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from p2pgpu import gpu
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.core.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.ledger import Ledger, decode_entry
from p2pgpu.core.units import format_coins, parse_coins
from p2pgpu.datadir import ENV_DATA_DIR, DataDir, GenesisInstall, default_data_dir, read_genesis_file
from p2pgpu.errors import ConfigError, MalformedInput, P2PGPUError

if TYPE_CHECKING:
    from p2pgpu.api_client import ApiClient

F = TypeVar("F", bound=Callable[..., Any])

# Where option callbacks leave what they saw; ``ctx.meta`` is shared by the
# root context and every subcommand's, so a later option overrides an
# earlier one whichever command it was given to.
_META_DATA_DIR = "p2pgpu.data_dir"
_META_JSON = "p2pgpu.json"

DEFAULT_NETWORK_NAME = "p2pgpu-testnet"


# ------------------------------------------------------------------ plumbing


# Exit statuses (README "Errors and exit codes"; the module docstring).
EXIT_OK = 0
EXIT_ERROR = 1  # something the user must fix: the message says what
EXIT_USAGE = 2  # click's: a bad option, a missing argument
EXIT_NOT_RUNNING = 3  # the command needs the node, and it is not running
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report 128 + 2

# Set by ``_RootGroup.parse_args`` from the raw command line, so that a usage
# error found before the --json option was processed is still JSON.
_META_ARGV_JSON = "p2pgpu.argv_json"


class _Failed(click.ClickException):
    """An error on its way out: ``error: <message>`` on one line of stderr,
    or with --json one object ``{"error": {"code", "message", "exit_code"}}``.

    ``code`` is a stable snake_case kind (``_error_code``). ``json_output``
    None means "decide from the command line" (``_RootGroup`` fills it in).
    """

    def __init__(
        self, message: str, *, code: str = "error", exit_code: int = EXIT_ERROR, json_output: bool | None = None
    ) -> None:
        super().__init__(" ".join(message.splitlines()))  # one line, whatever the message held
        self.code = code
        self.exit_code = exit_code
        self.json_output = json_output

    def show(self, file: Any = None) -> None:
        if self.json_output:
            error = {"code": self.code, "message": self.message, "exit_code": self.exit_code}
            click.echo(json.dumps({"error": error}), err=True, file=file)
        else:
            click.echo(f"error: {self.message}", err=True, file=file)


def _error_code(name: str) -> str:
    """An error class's name in snake_case: ``NodeNotRunning`` is
    ``node_not_running``, ``AddressInUse`` ``address_in_use``."""
    return "".join("_" + ch.lower() if ch.isupper() and i else ch.lower() for i, ch in enumerate(name))


def _exit_status(exc: P2PGPUError) -> int:
    # NodeNotRunning lives in api_client, which pulls in the server stack;
    # an instance of it can only exist once that module is imported.
    client = sys.modules.get("p2pgpu.api_client")
    if client is not None and isinstance(exc, client.NodeNotRunning):
        return EXIT_NOT_RUNNING
    return EXIT_ERROR


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _json_wanted(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(_META_JSON) or ctx.meta.get(_META_ARGV_JSON))


def _as_failure(exc: BaseException, json_output: bool) -> click.ClickException | None:
    """What an exception leaving a command becomes, or None to let it go.

    ``P2PGPUError``: its message, its code. Ctrl-C: exit 130. An exception
    group (trio's nurseries wrap what fails inside them, several layers
    deep): what its leaves are, when every leaf is one of ours or a Ctrl-C
    (the first error is the cause; the others, if any, followed from it).
    Click's own errors keep their exit status (2 for a usage error) and
    become one line too, naming the command's --help. Anything else is a bug: None, and it keeps its
    traceback.
    """
    if isinstance(exc, click.exceptions.Exit):
        return None
    if isinstance(exc, _Failed):
        if exc.json_output is None:
            exc.json_output = json_output
        return exc
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return _Failed("interrupted", code="interrupted", exit_code=EXIT_INTERRUPTED, json_output=json_output)
    if isinstance(exc, P2PGPUError):
        return _Failed(str(exc), code=_error_code(type(exc).__name__), exit_code=_exit_status(exc), json_output=json_output)
    if isinstance(exc, click.UsageError):
        # one line like every other error, pointing at the help click would have printed
        command = exc.ctx.command_path if exc.ctx is not None else "p2pgpu"
        message = exc.format_message() if json_output else f"{exc.format_message()} (see `{command} --help`)"
        return _Failed(message, code="usage_error", exit_code=exc.exit_code, json_output=json_output)
    if isinstance(exc, click.ClickException):
        return _Failed(exc.format_message(), exit_code=exc.exit_code, json_output=json_output)
    if isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return _as_failure(KeyboardInterrupt(), json_output)
        if all(isinstance(leaf, P2PGPUError) for leaf in leaves):
            return _as_failure(leaves[0], json_output)
    return None


class _RootGroup(click.Group):
    """The one place that turns errors into output and an exit status
    (``_as_failure``): for the command line's parsing and for every command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        words = args[: args.index("--")] if "--" in args else args
        ctx.meta[_META_ARGV_JSON] = "--json" in words
        try:
            return super().parse_args(ctx, args)
        except (click.ClickException, KeyboardInterrupt) as exc:
            failure = _as_failure(exc, _json_wanted(ctx))
            if failure is None or failure is exc:
                raise
            raise failure from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
            failure = _as_failure(exc, _json_wanted(ctx))
            if failure is None or failure is exc:
                raise
            raise failure from exc


@dataclass(frozen=True, slots=True)
class Settings:
    """What every command may use, fixed once the command line is parsed."""

    data_dir: DataDir
    json: bool


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value:  # absent flags arrive as False/None and must not override
            ctx.meta[key] = value
        return value

    return callback


def _output_options(*, envvar: bool = False) -> Callable[[F], F]:
    """``--data-dir`` and ``--json``; the root group also reads the env var."""

    def decorate(function: F) -> F:
        function = click.option(
            "--json",
            "json_output",
            is_flag=True,
            default=False,
            expose_value=False,
            callback=_remember(_META_JSON),
            help="Print JSON instead of text for people: one object (submit: one event per line).",
        )(function)
        function = click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            envvar=ENV_DATA_DIR if envvar else None,
            show_envvar=envvar,
            default=None,
            expose_value=False,
            callback=_remember(_META_DATA_DIR),
            help="The node's data directory [default: $XDG_DATA_HOME/p2pgpu or ~/.local/share/p2pgpu].",
        )(function)
        return function

    return decorate


def _with_settings(function: F) -> F:
    """Accept the common options on this command and pass ``Settings`` first."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        meta = click.get_current_context().meta
        path = meta.get(_META_DATA_DIR) or default_data_dir()
        settings = Settings(data_dir=DataDir(path), json=bool(meta.get(_META_JSON)))
        return function(settings, *args, **kwargs)

    return _output_options()(wrapper)  # type: ignore[return-value]


def _emit(settings: Settings, data: dict[str, Any], human: str) -> None:
    click.echo(json.dumps(data, indent=2) if settings.json else human)


def _rows(pairs: list[tuple[str, str]], width: int | None = None) -> str:
    """Aligned ``label: value`` lines for human output."""
    width = width or max(len(label) for label, _ in pairs) + 2
    return "\n".join(f"{label + ':':<{width}}{value}" for label, value in pairs)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _seconds(ms: int) -> str:
    return f"{ms // 1000} s" if ms % 1000 == 0 else f"{ms / 1000} s"


def _utc(ms: int) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "?"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# ----------------------------------------------------------------- the group


@click.group(cls=_RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@_output_options(envvar=True)
@click.version_option(package_name="p2pgpu", prog_name="p2pgpu")
def cli() -> None:
    """p2pgpu: a peer-to-peer marketplace for LLM inference on idle GPUs.

    Start with `p2pgpu init`. --json and --data-dir work on every command.
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``p2pgpu = "p2pgpu.cli:main"``)."""
    # Only the CLI configures logging handlers (STYLE.md); the library just logs.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli.main(args=argv, prog_name="p2pgpu")


# ------------------------------------------------------------------ identity


@cli.command()
@click.option(
    "--genesis",
    "genesis_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Install this genesis file: the network this node joins.",
)
@_with_settings
def init(settings: Settings, genesis_file: Path | None) -> None:
    """Create the data dir, node key and API token (safe to re-run).

    Re-running keeps the existing key and says so; nothing is ever replaced,
    except an installed genesis that cannot be read (--genesis repairs it,
    and says so). A valid genesis of another network is refused.
    """
    # Read the genesis first so a bad file changes nothing on disk.
    new_genesis = read_genesis_file(genesis_file) if genesis_file is not None else None
    data_dir = settings.data_dir
    data_dir.ensure()
    existed = data_dir.has_key()
    key = data_dir.load_or_create_key(create=True)
    data_dir.load_or_create_token(create=True)
    outcome = data_dir.install_genesis(new_genesis) if new_genesis is not None else GenesisInstall.UNCHANGED
    genesis = data_dir.genesis() if data_dir.has_genesis() else None

    headline = (
        f"This node's identity already existed in {data_dir.path}; nothing was replaced."
        if existed
        else f"Created a new node identity in {data_dir.path}."
    )
    rows = [("peer id", key.peer_id), ("data dir", str(data_dir.path))]
    if genesis is None:
        rows.append(("network", "none yet (install one with `p2pgpu init --genesis FILE`)"))
    else:
        suffix = {
            GenesisInstall.INSTALLED: " [installed now]",
            GenesisInstall.REPAIRED: " [installed now, replacing an unreadable genesis file]",
        }.get(outcome, "")
        rows.append(("network", f"{genesis.network_id.hex()} ({genesis.name}){suffix}"))
    _emit(
        settings,
        {
            "peer_id": key.peer_id,
            "public_key_hex": key.public_key.hex(),
            "data_dir": str(data_dir.path),
            "created": not existed,
            "network_id": genesis.network_id.hex() if genesis else None,
            "network_name": genesis.name if genesis else None,
            "genesis_installed": bool(outcome),
            "genesis_repaired": outcome is GenesisInstall.REPAIRED,
        },
        headline + "\n" + _rows(rows),
    )


@cli.command("id")
@_with_settings
def id_command(settings: Settings) -> None:
    """Print this node's peer id (its ledger account address)."""
    key = settings.data_dir.load_or_create_key(create=False)
    _emit(
        settings,
        {"peer_id": key.peer_id, "public_key_hex": key.public_key.hex(), "data_dir": str(settings.data_dir.path)},
        key.peer_id,
    )


# ------------------------------------------------------------------- genesis


@cli.group()
@_output_options()
def genesis() -> None:
    """Make and inspect network genesis files."""


class _Resolver:
    """Turns ``PEER_ID`` or ``self`` into a public key, loading our key once."""

    def __init__(self, data_dir: DataDir) -> None:
        self._data_dir = data_dir
        self._own: NodeKey | None = None

    def __call__(self, text: str, where: str) -> bytes:
        if text == "self":
            if self._own is None:
                self._own = self._data_dir.load_or_create_key(create=False)
            return self._own.public_key
        try:
            return public_key_from_peer_id(text)
        except MalformedInput as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _parse_allocations(items: tuple[str, ...], resolve: _Resolver) -> tuple[tuple[bytes, int], ...]:
    allocations: dict[bytes, int] = {}
    for item in items:
        peer, sep, coins = item.partition("=")
        where = f"--alloc {item!r}"
        if not sep or not peer or not coins:
            raise ConfigError(f"{where}: expected PEER_ID=COINS (or self=COINS)")
        public_key = resolve(peer.strip(), where)
        try:
            amount = parse_coins(coins)
        except MalformedInput as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if amount == 0:
            raise ConfigError(f"{where}: an allocation must be more than 0 coins")
        if public_key in allocations:
            raise ConfigError(f"{where}: {peer_id_from_public_key(public_key)} is allocated twice")
        allocations[public_key] = amount
    return tuple(sorted(allocations.items()))


@genesis.command("new")
@click.option("--faucet", required=True, metavar="PEER_ID|self", help="The only account allowed to mint coins.")
@click.option(
    "--alloc",
    "allocs",
    multiple=True,
    metavar="PEER_ID=COINS",
    help="Initial balance (repeatable). PEER_ID may be `self`; COINS like 12.5 (at most 6 decimals).",
)
@click.option("--name", default=DEFAULT_NETWORK_NAME, show_default=True, help="Network name (part of its id).")
@click.option("--max-skew", type=click.IntRange(min=0), metavar="SECONDS", help="Allowed clock skew of entries.")
@click.option(
    "--release-grace",
    type=click.IntRange(min=0),
    metavar="SECONDS",
    help="Wait after a hold's expiry before a release on time alone.",
)
@click.option("--max-hold", type=click.IntRange(min=1), metavar="SECONDS", help="Longest allowed hold.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@_with_settings
def genesis_new(
    settings: Settings,
    faucet: str,
    allocs: tuple[str, ...],
    name: str,
    max_skew: int | None,
    release_grace: int | None,
    max_hold: int | None,
    output: Path | None,
    force: bool,
) -> None:
    """Create a new network: print (or write) its genesis JSON.

    Every flag is checked before anything is written. Without -o the genesis
    JSON itself goes to stdout (with or without --json).
    """
    resolve = _Resolver(settings.data_dir)
    faucet_key = resolve(faucet, "--faucet")
    allocations = _parse_allocations(allocs, resolve)
    defaults = LedgerParams()
    params = LedgerParams(
        max_clock_skew_ms=defaults.max_clock_skew_ms if max_skew is None else max_skew * 1000,
        release_grace_ms=defaults.release_grace_ms if release_grace is None else release_grace * 1000,
        max_hold_ms=defaults.max_hold_ms if max_hold is None else max_hold * 1000,
    )
    made = Genesis(
        name=name,
        created_ms=time.time_ns() // 1_000_000,
        faucet=faucet_key,
        allocations=allocations,
        params=params,
    )
    text = made.to_json()
    # The core's parser is the authority on limits (name length, parameter
    # ranges, allocation sizes): refuse to write a file no node would load.
    try:
        Genesis.from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"these flags make an invalid genesis: {exc}") from None
    if output is None:
        click.echo(text, nl=False)
        return
    if output.exists() and not force:
        raise ConfigError(f"{output} already exists; pass --force to overwrite it")
    try:
        with click.open_file(str(output), "w", encoding="utf-8", atomic=True) as file:
            file.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
    _emit(
        settings,
        {"path": str(output), "name": made.name, "network_id": made.network_id.hex()},
        f"Wrote genesis {made.name!r} to {output}\nnetwork id: {made.network_id.hex()}",
    )


@genesis.command("show")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_with_settings
def genesis_show(settings: Settings, file: Path | None) -> None:
    """Show a genesis file (default: the one installed in the data dir)."""
    shown = read_genesis_file(file) if file is not None else settings.data_dir.genesis()
    allocations = [
        {"peer_id": peer_id_from_public_key(pk), "coins": format_coins(amount), "base_units": amount}
        for pk, amount in shown.allocations
    ]
    rows = [
        ("name", shown.name),
        ("network id", shown.network_id.hex()),
        ("created", f"{_utc(shown.created_ms)} ({shown.created_ms} ms)"),
        ("faucet", peer_id_from_public_key(shown.faucet)),
        ("allocations", f"{_plural(len(allocations), 'account')}, {format_coins(shown.total_allocated)} coins in all"),
    ]
    params = [
        ("max clock skew", _seconds(shown.params.max_clock_skew_ms)),
        ("release grace", _seconds(shown.params.release_grace_ms)),
        ("max hold", _seconds(shown.params.max_hold_ms)),
    ]
    width = max(len(label) for label, _ in rows + params) + 2
    lines = [_rows(rows, width)] + [f"  {a['peer_id']}  {a['coins']}" for a in allocations]
    lines.append(_rows(params, width))
    _emit(
        settings,
        {
            "name": shown.name,
            "network_id": shown.network_id.hex(),
            "network_tag": shown.network_tag,
            "created_ms": shown.created_ms,
            "faucet": peer_id_from_public_key(shown.faucet),
            "allocations": allocations,
            "total_allocated_base_units": shown.total_allocated,
            "total_allocated_coins": format_coins(shown.total_allocated),
            "params": {
                "max_clock_skew_ms": shown.params.max_clock_skew_ms,
                "release_grace_ms": shown.params.release_grace_ms,
                "max_hold_ms": shown.params.max_hold_ms,
            },
        },
        "\n".join(lines),
    )


# ---------------------------------------------------------------------- gpus


@cli.command()
@_with_settings
def gpus(settings: Settings) -> None:
    """List this machine's NVIDIA GPUs as NVML sees them."""
    report = gpu.probe()
    _emit(settings, gpu.report_to_json(report), gpu.format_report(report))


# ---------------------------------------------------------------------- node


@cli.group()
@_output_options()
def node() -> None:
    """Run this machine's node daemon."""


class _NodeRunCommand(click.Command):
    """``node run``, whose help shows each setting's default as
    ``p2pgpu.config.NodeConfig`` defines it (never written out here).

    The defaults are looked up only when help is shown: ``p2pgpu.config``
    pulls in the Ollama client, half a second at every start of every other
    command. The option's own default stays None, so an unset flag never
    masks the config file or a ``P2PGPU_*`` variable.
    """

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from p2pgpu.config import setting_defaults

        defaults = setting_defaults()
        saved = [(param, param.help) for param in self.params if isinstance(param, click.Option)]
        try:
            for param, text in saved:
                shown = _shown_default(param, defaults.get(param.name or ""))
                if shown is not None:
                    param.help = f"{text} [default: {shown}]"
            super().format_help(ctx, formatter)
        finally:
            for param, text in saved:
                param.help = text


def _shown_default(param: click.Option, value: Any) -> str | None:
    if value is None or value == ():
        return None
    if isinstance(value, bool):  # the flag that gives it: --provide, --no-offer-cpu
        return param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0]
    if param.name in ("price_in", "price_out", "gateway_limit_request", "gateway_limit_hour"):
        return f"{format_coins(value)} coins"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@node.command("run", cls=_NodeRunCommand)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="P2PGPU_CONFIG",
              help="TOML config file (keys in p2pgpu/config.py); flags override it.")
@click.option("--genesis", type=click.Path(dir_okay=False, path_type=Path), help="Join the network this genesis file defines.")
@click.option("--listen", metavar="MULTIADDR", help="libp2p listen address, /ip4|ip6/<address>/tcp/<port>.")
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR", help="Peer to join through (repeatable), with /p2p/<id>.")
@click.option("--ollama-host", metavar="URL", help="Local Ollama ($OLLAMA_HOST when set).")
@click.option("--provide/--no-provide", default=None, help="Offer this machine's inference (when Ollama answers).")
@click.option("--price-in", metavar="COINS", help="Price per million input tokens.")
@click.option("--price-out", metavar="COINS", help="Price per million output tokens.")
@click.option("--slots", type=int, help="Jobs run at once (what is advertised).")
@click.option("--offer-cpu/--no-offer-cpu", default=None, help="Offer CPU inference when no GPU is found.")
@click.option("--api-port", type=int, help="Local API port on 127.0.0.1 (0 picks a free one).")
@click.option("--gateway-listen", metavar="HOST:PORT",
              help="Ollama/OpenAI-compatible gateway address (port 0 picks a free one; off turns it off).")
@click.option("--gateway-token/--no-gateway-token", default=None,
              help="Gateway requests need the API token (--no-gateway-token: loopback only, as Ollama works).")
@click.option("--heartbeat", "heartbeat_s", type=float, help="Seconds between offers.")
@click.option("--offer-ttl", "offer_ttl_s", type=float, help="Seconds an offer stays valid.")
@click.option("--sync-interval", "sync_interval_s", type=float, help="Seconds between ledger anti-entropy rounds.")
@click.option("--queue-timeout", "queue_timeout_s", type=float,
              help="Longest a job waits for a free provider slot, in seconds.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@_with_settings
def node_run(settings: Settings, config_file: Path | None, verbose: int, **flags: Any) -> None:
    """Run the node until SIGINT or SIGTERM (then withdraw the offer and exit).

    Logs go to stderr. The local API's address is written to api.addr in the
    data dir, where the other commands find it. Defaults below are the
    built-in ones; --config and P2PGPU_* variables override them. Exits 0
    after SIGTERM, 130 after SIGINT (Ctrl-C), both after a clean shutdown.
    """
    import signal

    import trio

    from p2pgpu.config import load_config
    from p2pgpu.net.host import check_addresses
    from p2pgpu.node import run_until_signalled

    logging.getLogger().setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        for noisy in ("libp2p", "multiaddr", "hypercorn", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING if noisy != "libp2p" else logging.CRITICAL)
    flags["data_dir"] = settings.data_dir.path
    config = load_config(config_file, overrides=flags)
    # A mistyped address fails here, before the data dir or the ledger is touched.
    check_addresses([config.listen], config.bootstrap)
    if trio.run(run_until_signalled, config) == signal.SIGINT:
        click.get_current_context().exit(EXIT_INTERRUPTED)


# -------------------------------------------------------------------- ledger


@cli.group()
@_output_options()
def ledger() -> None:
    """Inspect the ledger in the data dir (offline: stop the node first)."""


def _verify(book: Ledger) -> dict[str, Any]:
    """Check every stored signature, then rebuild derived state from the
    entries and compare it with what was stored.

    Derived state (balances, holds) is a pure function of the entries, so
    a rebuild can only repair it; a difference means the stored state was
    stale or damaged. Conservation is checked before and after.
    """
    stored_hash = book.state_hash()
    stored_total, stored_minted = book.conservation()
    entries = bad_signatures = 0
    for account in list(book.accounts()):
        for wire in book.chain(account.public_key, 1, 2**62):
            entries += 1
            try:
                decode_entry(wire, book.network_id, verify=True)
            except P2PGPUError:
                bad_signatures += 1
    book.rebuild()
    total, minted = book.conservation()
    states = list(book.accounts())
    consistent = stored_hash == book.state_hash()
    conserved = total == minted and stored_total == stored_minted
    return {
        "network_id": book.network_id.hex(),
        "network_name": book.genesis.name,
        "entries": entries,
        "bad_signatures": bad_signatures,
        "accounts": len(states),
        "frozen_accounts": sum(1 for state in states if state.frozen),
        "minted_base_units": minted,
        "total_base_units": total,
        "stored_state_hash": stored_hash.hex(),
        "state_hash": book.state_hash().hex(),
        "derived_state_consistent": consistent,
        "conservation_ok": conserved,
        "ok": conserved and consistent and bad_signatures == 0,
    }


@ledger.command("verify")
@_with_settings
def ledger_verify(settings: Settings) -> None:
    """Rebuild the ledger's derived state and check it (exit 1 on a problem).

    For after a crash or `kill -9`: checks every entry's signature, replays
    all entries, compares the result with the stored state, and checks that
    balances + held + pending equal the coins minted. Repairs stale derived
    state as it goes (the entries themselves are never changed).
    """
    book = settings.data_dir.open_ledger()
    try:
        result = _verify(book)
    finally:
        book.close()
    if result["bad_signatures"]:
        signatures = f" ({result['bad_signatures']} with BAD SIGNATURES)"
    else:
        signatures = " (signatures ok)"
    if result["derived_state_consistent"]:
        derived = "matches the entries"
    else:
        derived = f"DIFFERED from the entries (was {result['stored_state_hash']}); rebuilt"
    rows = [
        ("network", f"{result['network_id']} ({result['network_name']})"),
        ("entries", f"{result['entries']}{signatures}"),
        ("accounts", f"{result['accounts']} ({result['frozen_accounts']} frozen)"),
        ("minted", f"{format_coins(result['minted_base_units'])} coins"),
        ("state hash", result["state_hash"]),
        ("derived state", derived),
        ("conservation", "OK (balances + held + pending = minted)" if result["conservation_ok"] else "FAILED"),
    ]
    _emit(settings, result, _rows(rows))
    if not result["ok"]:
        click.get_current_context().exit(1)


# ------------------------------------------------------ the running node's API


@contextlib.contextmanager
def _node(settings: Settings) -> Iterator[ApiClient]:
    """A client of the running node's local API, closed on the way out.

    Imported here, not at the top: the client pulls in the API module's
    server stack (Starlette, hypercorn, trio), which the offline commands
    (`init`, `id`, `genesis`...) should not pay for at every start.
    """
    from p2pgpu.api_client import ApiClient

    client = ApiClient.from_data_dir(settings.data_dir)
    try:
        yield client
    finally:
        client.close()


def _safe(value: Any) -> str:
    """Text from the network, made harmless for a terminal.

    Memos, model names and addresses are chosen by other peers; printed raw,
    an escape sequence in one could rewrite the screen (or a bidi override
    disguise a peer id). Every unprintable character is shown as ``\\uXXXX``.
    """
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def _coins(base_units: Any, unit: str = " coins") -> str:
    return f"{format_coins(base_units)}{unit}" if type(base_units) is int else "?"


def _duration(seconds: Any) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``: two units at most."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds != seconds:
        return "?"
    total = max(0, int(seconds))
    parts = []
    for size, suffix in ((86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")):
        count, total = divmod(total, size)
        if count or (parts and len(parts) < 2):
            parts.append(f"{count}{suffix}")
        if len(parts) == 2:
            break
    return " ".join(parts) or "0s"


def _count(value: Any, one: str, many: str) -> str:
    return f"{value} {one if value == 1 else many}" if type(value) is int else f"? {many}"


def _gib(size: Any) -> str:
    return f"{size / 2**30:.1f} GiB" if type(size) is int else "?"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, headed by ``headers``."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [headers, *rows]
    )


def _positive_coins(text: str) -> int:
    amount = parse_coins(text)
    if amount == 0:
        raise MalformedInput("the amount must be more than 0 coins")
    return amount


@cli.command()
@_with_settings
def status(settings: Settings) -> None:
    """Show the running node: identity, network, peers, balance."""
    with _node(settings) as node:
        info = node.status()
    network = info.get("network") or {}
    addrs = info.get("listen_addrs") or []
    frozen = info.get("frozen")
    rows = [
        ("peer id", _safe(info.get("peer_id"))),
        ("network", f"{_safe(network.get('id'))} ({_safe(network.get('name'))})"),
        ("role", _safe(info.get("role")) + (", faucet" if info.get("faucet") else "")),
        # why a node offers nothing (no Ollama, no models, no GPU without --offer-cpu) is said here
        ("offering", "yes" if info.get("provider") == "offering" else "no: " + _safe(info.get("provider"))),
        ("version", _safe(info.get("version"))),
        ("uptime", _duration(info.get("uptime_s"))),
        ("listening on", ", ".join(map(_safe, addrs)) or "nothing"),
        # where Ollama and OpenAI clients point (README "Using the network from your tools")
        ("gateway", _safe(info.get("gateway")) + " (Ollama API; OpenAI under /v1)" if info.get("gateway") else "off"),
        ("peers", f"{_safe(info.get('peers'))} connected"),
        ("offers seen", _safe(info.get("offers_seen"))),
        ("balance", _coins(info.get("balance"))),
        ("held", _coins(info.get("held"))),
        ("pending in", _coins(info.get("pending_in"))),
        ("spendable", _coins(info.get("spendable"))),
        ("own chain", _count(info.get("entries"), "entry", "entries")),
        ("frozen", ", ".join(map(_safe, frozen)) if isinstance(frozen, list) and frozen else "no accounts"),
    ]
    _emit(settings, info, _rows(rows))


@cli.command()
@_with_settings
def peers(settings: Settings) -> None:
    """List the peers the running node knows."""
    with _node(settings) as node:
        known = node.peers()
    rows = []
    for peer in known:
        addrs = [_safe(addr) for addr in peer.get("addrs") or []]
        shown = addrs[0] + (f" (+{len(addrs) - 1} more)" if len(addrs) > 1 else "") if addrs else "-"
        rows.append(
            [
                _safe(peer.get("peer_id")),
                "connected" if peer.get("connected") else "known",
                _duration(peer["since_s"]) if peer.get("since_s") is not None else "-",
                "yes" if peer.get("bootstrap") else "",
                shown,
            ]
        )
    human = _table(["PEER ID", "STATE", "SINCE", "BOOTSTRAP", "ADDRESS"], rows) if rows else "No peers known yet."
    _emit(settings, {"peers": known}, human)


def _offer_gpus(offer: dict[str, Any]) -> str:
    gpus = offer.get("gpus") or []
    if not gpus:
        return "CPU only" if offer.get("cpu") else "-"
    shown = []
    for gpu_info in gpus:
        free = f", {_gib(gpu_info.get('vram_free'))} free" if gpu_info.get("vram_free") is not None else ""
        shown.append(f"{_safe(gpu_info.get('name'))} ({_gib(gpu_info.get('vram_total'))}{free})")
    return "; ".join(shown) + (" [cpu]" if offer.get("cpu") else "")


@cli.command()
@click.option("--model", metavar="NAME", help="Only offers serving this model.")
@_with_settings
def offers(settings: Settings, model: str | None) -> None:
    """List the live offers the running node has seen, best first."""
    with _node(settings) as node:
        seen = node.offers(model)
    rows = [
        [
            _safe(offer.get("provider")),
            ", ".join(
                _safe(item.get("name")) + ("*" if item.get("warm") else "") for item in offer.get("models") or []
            )
            or "-",
            _offer_gpus(offer),
            _coins(offer.get("price_in"), ""),
            _coins(offer.get("price_out"), ""),
            f"{_safe(offer.get('slots_free'))}/{_safe(offer.get('slots_total'))}",
            _duration(offer.get("expires_in_s")),
        ]
        for offer in seen
    ]
    if rows:
        human = (
            _table(["PROVIDER", "MODELS", "GPUS", "IN/1M", "OUT/1M", "SLOTS", "EXPIRES IN"], rows)
            + "\nPrices in coins per million tokens (in: prompt, out: generated); * = model loaded (warm)."
        )
    else:
        human = f"No offers for {_safe(model)} seen yet." if model else "No offers seen yet."
    _emit(settings, {"offers": seen}, human)


@cli.command()
@click.option("--account", metavar="PEER_ID", help="Another account [default: this node's].")
@_with_settings
def wallet(settings: Settings, account: str | None) -> None:
    """Show an account's balance and its history, sent and received."""
    with _node(settings) as node:
        info = node.wallet(account)
    rows = [
        ("account", _safe(info.get("account"))),
        ("balance", _coins(info.get("balance"))),
        ("held", _coins(info.get("held")) + " (locked for jobs in flight)"),
        ("pending in", _coins(info.get("pending_in")) + " (sent to it, not received yet)"),
        ("spendable", _coins(info.get("spendable"))),
    ]
    if info.get("frozen"):
        rows.append(("frozen", "YES: this account forked its chain; every replica refuses its new entries"))
    history = info.get("history") or []
    lines = [_rows(rows), ""]
    if history:
        table = []
        for item in history:
            incoming = item.get("direction") == "in"
            amount = item.get("amount")
            table.append(
                [
                    _utc(item["timestamp_ms"]) if type(item.get("timestamp_ms")) is int else "?",
                    "received" if incoming else "sent",
                    _safe(item.get("kind")),
                    ("+" if incoming else "-") + _coins(amount, "") if type(amount) is int else "?",
                    _safe(item.get("counterparty")),
                    _safe(item.get("memo")) if item.get("memo") else "",
                ]
            )
        headers = ["TIME", "DIRECTION", "KIND", "AMOUNT", "COUNTERPARTY", "MEMO"]
        lines += ["History (newest first):", _table(headers, table)]
    else:
        lines.append("No history yet.")
    _emit(settings, info, "\n".join(lines))


def _transfer_lines(verb: str, answer: dict[str, Any]) -> str:
    return _rows(
        [
            (verb, f"{_coins(answer.get('amount'))} to {_safe(answer.get('to'))}"),
            ("entry", _safe(answer.get("entry_id"))),
        ]
    )


@cli.command()
@click.argument("to", metavar="TO")
@click.argument("amount", metavar="AMOUNT_COINS")
@click.option("--memo", default="", help="A note stored with the entry (public: every replica sees it).")
@_with_settings
def send(settings: Settings, to: str, amount: str, memo: str) -> None:
    """Send coins to the account TO (a peer id); AMOUNT_COINS like 12.5."""
    base_units = _positive_coins(amount)
    with _node(settings) as node:
        answer = node.send(to, base_units, memo)
    _emit(settings, answer, _transfer_lines("sent", answer))


@cli.command()
@click.argument("words", nargs=-1, metavar="[TO] AMOUNT_COINS")
@_with_settings
def faucet(settings: Settings, words: tuple[str, ...]) -> None:
    """Mint coins for TO [default: this node]; only the faucet's own node can.

    AMOUNT_COINS like 100 or 0.5.
    """
    if len(words) not in (1, 2):
        raise click.UsageError("expected [TO] AMOUNT_COINS")
    base_units = _positive_coins(words[-1])
    with _node(settings) as node:
        to = words[0] if len(words) == 2 else node.status().get("peer_id")
        if not isinstance(to, str):
            raise ConfigError("the node did not say its own peer id; give TO explicitly")
        answer = node.faucet(to, base_units)
    _emit(settings, answer, _transfer_lines("minted", answer))


def _safe_text(text: Any) -> str:
    """Generated text for a terminal: like ``_safe``, but newlines and tabs stay."""
    return "".join(ch if ch in "\n\t" or ch.isprintable() else f"\\u{ord(ch):04x}" for ch in str(text))


def _read_messages(path: Path) -> list[tuple[str, str]]:
    """``--messages FILE``: a JSON list of ``{"role": ..., "content": ...}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedInput(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise MalformedInput(f'{path}: expected a non-empty JSON list of {{"role": ..., "content": ...}}')
    messages = []
    for index, item in enumerate(data):
        if not (isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)):
            raise MalformedInput(f'{path}: item {index} is not {{"role": "...", "content": "..."}}')
        messages.append((item["role"], item["content"]))
    return messages


def _summary(done: dict[str, Any], retries: int) -> str:
    speed = done.get("tokens_per_s")
    rate = f"{speed:.1f} tok/s" if isinstance(speed, (int, float)) and not isinstance(speed, bool) else "? tok/s"
    line = (
        f"provider {_safe(done.get('provider'))}, {_count(done.get('tokens'), 'token', 'tokens')}, "
        f"{rate}, cost {_coins(done.get('cost'))}"
    )
    if retries:
        line += f" (after {retries} {'retry' if retries == 1 else 'retries'})"
    return line


@cli.command()
@click.argument("prompt", required=False, metavar="PROMPT")
@click.option("--model", required=True, metavar="NAME", help="The model to run (see `p2pgpu offers`).")
@click.option("--system", metavar="TEXT", help="A system prompt.")
@click.option("--max-tokens", type=click.IntRange(1, 131_072), default=256, show_default=True, help="Longest answer.")
@click.option("--max-price", metavar="COINS", help="The most the whole job may cost, like 0.5.")
@click.option(
    "--messages",
    "messages_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help='A chat instead of PROMPT: a JSON list of {"role": "system|user|assistant", "content": "..."}.',
)
@click.option("--no-retry", is_flag=True, help="Fail rather than move on to the next provider.")
@_with_settings
def submit(
    settings: Settings,
    prompt: str | None,
    model: str,
    system: str | None,
    max_tokens: int,
    max_price: str | None,
    messages_file: Path | None,
    no_retry: bool,
) -> None:
    """Run PROMPT on the network and print the answer as it arrives.

    PROMPT `-` reads it from stdin. The provider, token count, speed and
    cost follow on stderr. With --json: one JSON event per line on stdout.
    """
    if (prompt is None) == (messages_file is None):
        raise click.UsageError("give PROMPT or --messages FILE (one of them)")
    messages = _read_messages(messages_file) if messages_file is not None else None
    if prompt == "-":
        prompt = sys.stdin.read()
    price = parse_coins(max_price) if max_price is not None else None
    retries = 0
    ends_in_newline = True
    final: dict[str, Any] | None = None
    with _node(settings) as node:
        events = node.submit(
            model,
            prompt,
            messages=messages,
            system=system,
            max_tokens=max_tokens,
            max_price=price,
            retry=not no_retry,
        )
        for event in events:
            kind = event.get("type")
            if settings.json:
                click.echo(json.dumps(event))
            elif kind == "token" and "channel" not in event:  # thinking, tool calls, vectors are not the answer
                text = _safe_text(event.get("text", ""))
                if text:
                    click.echo(text, nl=False)
                    ends_in_newline = text.endswith("\n")
            elif kind == "retry":
                # stdout keeps one answer: the next provider continues it rather than start again
                failed = f"provider {_safe(event.get('provider'))} failed ({_safe(event.get('reason'))})"
                if event.get("continues"):
                    delivered = _count(event.get("tokens_delivered"), "token", "tokens")
                    click.echo(f"{failed} after {delivered}; the next provider continues the answer", err=True)
                else:
                    click.echo(f"{failed}; trying the next provider", err=True)
            elif kind == "queued":
                click.echo(
                    f"waiting: every provider is busy; this job ({_safe(event.get('job_id'))}) "
                    f"is number {_safe(event.get('position'))} in line",
                    err=True,
                )
            if kind == "retry":
                retries += 1
            if kind in ("done", "error"):
                final = event
    if not settings.json and not ends_in_newline:
        click.echo()
    if final is None:  # the client raises first; kept for a stream it let through
        raise _Failed("the node ended the job without a result")
    if final.get("type") == "error":
        # the stream's last event says it on stdout; stderr says it the way every error is said
        kind = final.get("kind") if isinstance(final.get("kind"), str) else "ExecutionFailed"
        raise _Failed(_safe(final.get("error")), code=_error_code(kind), json_output=settings.json)
    if not settings.json:
        click.echo(_summary(final, retries), err=True)


# ---------------------------------------------------------------------- jobs


def _short_peer(peer: Any) -> str:
    """A peer id cut for a table: every one starts with ``12D3KooW``, so
    the end is what tells them apart (``--json`` has them whole)."""
    if not isinstance(peer, str) or not peer:
        return "-"
    text = _safe(peer)
    return text if len(text) <= 15 else "..." + text[-12:]


def _job_tokens(job: dict[str, Any]) -> str:
    tokens_in = job.get("tokens_in")
    shown_in = str(tokens_in) if type(tokens_in) is int else "-"
    tokens_out = job.get("tokens_out")
    return f"{shown_in}/{tokens_out if type(tokens_out) is int else '?'}"


def _since(job: dict[str, Any], key: str) -> str:
    """A job's moment as seconds after it was created."""
    moment, created = job.get(key), job.get("created_ms")
    if type(moment) is not int or type(created) is not int:
        return "-"
    return f"+{(moment - created) / 1000:.2f} s"


@cli.command()
@click.option("--role", type=click.Choice(["consumer", "provider"]),
              help="Only the jobs this node submitted (consumer) or served (provider).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Show the newest N.")
@_with_settings
def jobs(settings: Settings, role: str | None, limit: int) -> None:
    """List this node's jobs, newest first: those it submitted and those it served.

    TOKENS is in/out (prompt / answer); COST is what the consumer pays;
    PEER is the other side. `p2pgpu job show ID` has the details.
    """
    with _node(settings) as node:
        listed = node.jobs(role, limit)
    rows = [
        [
            _safe(job.get("id"))[:12],
            _safe(job.get("role")),
            _safe(job.get("status")),
            _safe(job.get("model")),
            _short_peer(job.get("peer")),
            _job_tokens(job),
            _coins(job.get("cost"), ""),
            _duration(job.get("age_s")),
        ]
        for job in listed
    ]
    if rows:
        human = _table(["ID", "ROLE", "STATUS", "MODEL", "PEER", "TOKENS", "COST", "AGE"], rows)
    else:
        human = f"No {role} jobs yet." if role else "No jobs yet."
    _emit(settings, {"jobs": listed}, human)


@cli.group()
@_output_options()
def job() -> None:
    """Show or cancel one of this node's jobs.

    ID is the job id from `p2pgpu jobs` (or `submit --json`), or its first
    few hex digits (at least 4) when no other job starts the same way.
    """


def _job_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    release = info.get("release")
    hold = _safe(info.get("hold_id")) + (f" ({_safe(release)})" if release else "") if info.get("hold_id") else "-"
    rows = [
        ("id", _safe(info.get("id"))),
        ("role", _safe(info.get("role"))),
        ("status", _safe(info.get("status"))),
        ("model", _safe(info.get("model"))),
        ("provider", _safe(info.get("provider"))),
        ("consumer", _safe(info.get("consumer"))),
        ("created", _utc(info["created_ms"]) if type(info.get("created_ms")) is int else "?"),
        ("started", _since(info, "started_ms")),
        ("first token", _since(info, "first_token_ms")),
        ("ended", _since(info, "ended_ms")),
        ("tokens", f"{_job_tokens(info)} (in/out)"),
        ("cost", _coins(info.get("cost"))),
        ("hold", hold),
    ]
    if info.get("reason"):
        rows.append(("reason", _safe(info.get("reason"))))
    return rows


@job.command("show")
@click.argument("job_id", metavar="ID")
@_with_settings
def job_show(settings: Settings, job_id: str) -> None:
    """Show one job: its record, the providers tried, and its answer."""
    with _node(settings) as node:
        info = node.job(job_id)
    lines = [_rows(_job_rows(info))]
    attempts = info.get("attempts") or []
    if attempts:
        lines.append("attempts:")
        for number, attempt in enumerate(attempts, start=1):
            outcome = _safe(attempt.get("outcome")) if attempt.get("outcome") else "running"
            lines.append(f"  {number}. {_safe(attempt.get('provider'))}: {outcome}")
    text = info.get("text")
    if isinstance(text, str) and text:
        cut = " (cut: only the start is kept)" if info.get("text_cut") else ""
        lines += ["", f"answer{cut}:", _safe_text(text)]
    _emit(settings, info, "\n".join(lines))


@job.command("cancel")
@click.argument("job_id", metavar="ID")
@_with_settings
def job_cancel(settings: Settings, job_id: str) -> None:
    """Stop a job that is waiting or running; it pays for the tokens delivered so far."""
    with _node(settings) as node:
        info = node.cancel_job(job_id)
    status = info.get("status")
    if status in ("queued", "running"):
        human = f"Asked job {_safe(info.get('id'))} to stop; it is still stopping (status {_safe(status)})."
    else:
        human = (
            f"Job {_safe(info.get('id'))} is {_safe(status)}: "
            f"{_count(info.get('tokens_out'), 'token', 'tokens')} delivered, cost {_coins(info.get('cost'))}."
        )
    _emit(settings, info, human)


if __name__ == "__main__":
    main()
