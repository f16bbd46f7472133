"""Node configuration: defaults < TOML file < P2PGPU_* environment < flags,
and every bad value is a ConfigError that names the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pgpu.config import NodeConfig, load_config
from p2pgpu.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_precedence_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, 'data_dir = "relative/data"\nslots = 2\nprice_out = "2.5"\nbootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/a"]\n')
    config = load_config(path, environ={})
    assert (config.slots, config.price_out, config.bootstrap) == (2, 2_500_000, ("/ip4/127.0.0.1/tcp/1/p2p/a",))
    config = load_config(path, environ={"P2PGPU_SLOTS": "3", "P2PGPU_BOOTSTRAP": "a, b"})
    assert config.slots == 3 and config.bootstrap == ("a", "b")
    config = load_config(path, overrides={"slots": 4, "price_out": None}, environ={"P2PGPU_SLOTS": "3"})
    assert config.slots == 4 and config.price_out == 2_500_000
    assert load_config(None, environ={"P2PGPU_CONFIG": str(path)}).slots == 2


def test_defaults_are_safe(tmp_path):
    config = load_config(None, overrides={"data_dir": tmp_path}, environ={})
    assert config.data_dir == tmp_path and config.api_port == 0 and config.slots == 1
    assert config.offer_ttl_s > config.heartbeat_s
    assert not config.offer_cpu


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("slots = 0", "slots"),
        ('slots = "many"', "slots"),
        ('price_in = "-1"', "price_in"),
        ('price_in = "0.0000001"', "price_in"),
        ("offer_cpu = 3", "offer_cpu"),
        ("heartbeat_s = 40\noffer_ttl_s = 30", "offer_ttl_s"),
        ("api_port = 70000", "api_port"),
        ("colour = 'blue'", "unknown keys colour"),
        ("slots = [", "not valid TOML"),
    ],
)
def test_bad_values_name_the_setting(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, text), overrides={"data_dir": tmp_path}, environ={})


def test_bad_environment_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="provide"):
        load_config(None, overrides={"data_dir": tmp_path}, environ={"P2PGPU_PROVIDE": "maybe"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(None, overrides={"colour": "blue"}, environ={})


def test_config_is_frozen(tmp_path):
    config = NodeConfig(data_dir=tmp_path)
    with pytest.raises(AttributeError):
        config.slots = 5  # type: ignore[misc]
