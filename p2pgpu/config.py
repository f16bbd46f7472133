"""Node configuration: one frozen dataclass, built from (lowest to highest
precedence) defaults, a TOML file, ``P2PGPU_*`` environment variables, and
command-line flags.

Keys (TOML name = environment variable without the ``P2PGPU_`` prefix,
lower-cased; prices are in coins per million tokens, written as strings so no
float ever touches money)::

    data_dir        = "~/.local/share/p2pgpu"
    listen          = "/ip4/0.0.0.0/tcp/4001"
    bootstrap       = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    genesis         = "genesis.json"          # installed into the data dir on first run
    ollama_host     = "http://127.0.0.1:11434"
    provide         = true                    # publish offers when Ollama answers
    price_in        = "0.5"                   # coins per million input tokens
    price_out       = "1.5"                   # coins per million output tokens
    slots           = 1                       # jobs run at once = slots advertised
    max_credit_window = 32                    # tokens streamed ahead of a consumer's vouchers, at most
    offer_cpu       = false                   # offer CPU inference when no GPU is found
    api_port        = 0                       # local API on 127.0.0.1; 0 picks a free port
    heartbeat_s     = 10
    offer_ttl_s     = 30
    sync_interval_s = 10
    queue_timeout_s = 300                     # longest a job waits for a free provider slot
    gateway_listen  = "127.0.0.1:11435"       # the Ollama/OpenAI gateway; "off" turns it off
    gateway_token   = true                    # gateway requests need the API token (false: loopback only)
    gateway_allow_remote = false              # allow a non-loopback gateway address (token required)
    gateway_limit_request = "0.1"             # most coins one gateway request may spend
    gateway_limit_hour    = "1"               # most coins the gateway may spend in any hour

Environment lists (``P2PGPU_BOOTSTRAP``) are comma-separated.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Mapping

from p2pgpu.core.units import parse_coins
from p2pgpu.datadir import default_data_dir
from p2pgpu.errors import ConfigError, MalformedInput
from p2pgpu.executor import default_ollama_host
from p2pgpu.httpserve import is_loopback

ENV_PREFIX = "P2PGPU_"

DEFAULT_GATEWAY_LISTEN: Final = "127.0.0.1:11435"
DEFAULT_LIMIT_REQUEST: Final = 100_000  # 0.1 coin: about 65k output tokens at the default 1.5 coins per million
DEFAULT_LIMIT_HOUR: Final = 1_000_000  # 1 coin
DEFAULT_MAX_TOKENS: Final = 2048
"""``num_predict``/``max_tokens`` when a client gives none (Ollama's own
default runs to the context's end; a paid job needs a bound for its hold)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where the gateway (``p2pgpu.gateway``) listens and what it allows: a
    non-loopback address only when allowed, and then only with the token."""

    listen: str = DEFAULT_GATEWAY_LISTEN  # "host:port"; "" or "off" turns the gateway off
    token: bool = True  # requests must carry the API token
    allow_remote: bool = False
    limit_request: int = DEFAULT_LIMIT_REQUEST  # base units
    limit_hour: int = DEFAULT_LIMIT_HOUR
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def enabled(self) -> bool:
        return self.listen.strip().lower() not in ("", "off", "none", "false")

    def address(self) -> tuple[str, int]:
        """(host, port), checked; ``ConfigError`` says what is wrong and what to set."""
        text = self.listen.strip()
        host, sep, port_text = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"gateway_listen must be HOST:PORT (e.g. {DEFAULT_GATEWAY_LISTEN}), not {text!r}")
        if not is_loopback(host):
            if not self.allow_remote:
                raise ConfigError(
                    f"gateway_listen {text!r} is not a loopback address: the gateway spends this node's coins, "
                    "so it listens on 127.0.0.1 unless you set gateway_allow_remote = true (which needs the token)")
            if not self.token:
                raise ConfigError("a gateway on a non-loopback address must require the API token "
                                  "(gateway_token = true)")
        return ("127.0.0.1" if host == "localhost" else host), int(port_text)




@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path
    listen: str = "/ip4/0.0.0.0/tcp/4001"
    bootstrap: tuple[str, ...] = ()
    genesis: Path | None = None
    ollama_host: str = dataclasses.field(default_factory=default_ollama_host)
    provide: bool = True
    price_in: int = 500_000  # base units per million input tokens (0.5 coin)
    price_out: int = 1_500_000  # base units per million output tokens (1.5 coins)
    slots: int = 1
    max_credit_window: int = 32  # p2pgpu.core.trust.DEFAULT_MAX_CREDIT_WINDOW
    offer_cpu: bool = False
    api_port: int = 0
    heartbeat_s: float = 10.0
    offer_ttl_s: float = 30.0
    sync_interval_s: float = 10.0
    queue_timeout_s: float = 300.0
    gateway_listen: str = DEFAULT_GATEWAY_LISTEN
    gateway_token: bool = True
    gateway_allow_remote: bool = False
    gateway_limit_request: int = DEFAULT_LIMIT_REQUEST  # base units
    gateway_limit_hour: int = DEFAULT_LIMIT_HOUR

    def __post_init__(self) -> None:
        if not 1 <= self.slots <= 1024:
            raise ConfigError(f"slots must be between 1 and 1024, not {self.slots}")
        if not 1 <= self.max_credit_window <= 4096:
            raise ConfigError(f"max_credit_window must be between 1 and 4096 tokens, not {self.max_credit_window}")
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api_port must be a TCP port, not {self.api_port}")
        if not 0.05 <= self.heartbeat_s <= 3600:
            raise ConfigError("heartbeat_s must be between 0.05 and 3600")
        if self.offer_ttl_s <= self.heartbeat_s:
            raise ConfigError("offer_ttl_s must be longer than heartbeat_s (else offers expire between heartbeats)")
        if self.price_in < 0 or self.price_out < 0:
            raise ConfigError("prices cannot be negative")
        if not 0 <= self.queue_timeout_s <= 86_400:
            raise ConfigError("queue_timeout_s must be between 0 and 86400")
        if self.gateway_limit_request < 0 or self.gateway_limit_hour < 0:
            raise ConfigError("gateway spending limits cannot be negative")
        gateway = self.gateway()
        if gateway.enabled:
            gateway.address()  # a bad or unsafe address fails here, with what to set

    def gateway(self) -> GatewayConfig:
        """The gateway's part of the configuration."""
        return GatewayConfig(listen=self.gateway_listen, token=self.gateway_token,
                             allow_remote=self.gateway_allow_remote, limit_request=self.gateway_limit_request,
                             limit_hour=self.gateway_limit_hour)


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def setting_defaults() -> dict[str, Any]:
    """Each setting's built-in default, from ``NodeConfig`` itself (default
    factories called now), for ``p2pgpu node run --help``. Settings without
    a default (``data_dir``) are left out."""
    defaults: dict[str, Any] = {}
    for name, field in _FIELDS.items():
        if field.default is not dataclasses.MISSING:
            defaults[name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[name] = field.default_factory()
    return defaults


def _convert(name: str, value: Any) -> Any:
    """Turn a TOML/env/flag value into the field's type, with a clear error."""
    try:
        if name in ("data_dir", "genesis"):
            return Path(str(value)).expanduser()
        if name == "bootstrap":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(item.strip() for item in items if str(item).strip())
        if name in ("price_in", "price_out", "gateway_limit_request", "gateway_limit_hour"):
            return value if isinstance(value, int) and not isinstance(value, bool) else parse_coins(str(value))
        if name in ("provide", "offer_cpu", "gateway_token", "gateway_allow_remote"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if name in ("slots", "api_port", "max_credit_window"):
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if name in ("heartbeat_s", "offer_ttl_s", "sync_interval_s", "queue_timeout_s"):
            return float(value)
        return str(value)
    except (ValueError, TypeError, MalformedInput) as exc:
        raise ConfigError(f"config {name}: {exc}") from exc


def load_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Defaults < TOML file < environment < ``overrides`` (flags; None values
    are ignored so unset flags do not mask the file)."""
    values: dict[str, Any] = {}
    environ = os.environ if environ is None else environ
    path = Path(config_file).expanduser() if config_file else None
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = Path(environ[ENV_PREFIX + "CONFIG"]).expanduser()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)}")
        values.update({k: _convert(k, v) for k, v in raw.items()})
    for name in _FIELDS:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None and env_value != "":
            values[name] = _convert(name, env_value)
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name}")
        if value is not None and value != ():
            values[name] = _convert(name, value)
    values.setdefault("data_dir", default_data_dir())
    return NodeConfig(**values)
