"""Where the gateway listens and who may use it (issue 11): its settings
come like every other key (TOML, ``P2PGPU_*``, flags), and an unsafe
address is refused before the node starts, saying what to set."""

from __future__ import annotations

import pytest

from p2pgpu.config import DEFAULT_GATEWAY_LISTEN, GatewayConfig, load_config
from p2pgpu.errors import ConfigError


def test_the_defaults_are_a_loopback_gateway_with_the_token_and_small_limits(tmp_path):
    config = load_config(overrides={"data_dir": tmp_path}, environ={})
    gateway = config.gateway()
    assert gateway.listen == DEFAULT_GATEWAY_LISTEN == "127.0.0.1:11435" and gateway.token and gateway.enabled
    assert gateway.address() == ("127.0.0.1", 11435)
    assert (gateway.limit_request, gateway.limit_hour) == (100_000, 1_000_000)  # 0.1 and 1 coin


def test_settings_come_from_the_file_the_environment_and_flags(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('gateway_listen = "127.0.0.1:0"\ngateway_limit_request = "0.25"\ngateway_token = false\n')
    config = load_config(path, overrides={"data_dir": tmp_path},
                         environ={"P2PGPU_GATEWAY_LIMIT_HOUR": "3.5"})
    gateway = config.gateway()
    assert gateway.address() == ("127.0.0.1", 0) and not gateway.token
    assert (gateway.limit_request, gateway.limit_hour) == (250_000, 3_500_000)
    off = load_config(overrides={"data_dir": tmp_path, "gateway_listen": "off"}, environ={})
    assert not off.gateway().enabled


@pytest.mark.parametrize("settings, words", [
    ({"gateway_listen": "0.0.0.0:11435"}, "gateway_allow_remote"),
    ({"gateway_listen": "192.0.2.7:11435", "gateway_allow_remote": True, "gateway_token": False}, "token"),
    ({"gateway_listen": "nonsense"}, "HOST:PORT"),
    ({"gateway_listen": "127.0.0.1:99999"}, "HOST:PORT"),
    ({"gateway_limit_hour": "-1"}, "negative"),
    ({"gateway_token": "perhaps"}, "true or false"),
])
def test_an_unsafe_or_malformed_gateway_setting_is_refused_saying_what_to_set(tmp_path, settings, words):
    with pytest.raises(ConfigError, match=words):
        load_config(overrides={"data_dir": tmp_path, **settings}, environ={})


def test_a_remote_gateway_is_allowed_only_explicitly_and_only_with_the_token():
    assert GatewayConfig(listen="0.0.0.0:8080", allow_remote=True).address() == ("0.0.0.0", 8080)
    assert GatewayConfig(listen="[::1]:8080", token=False).address() == ("::1", 8080)
    assert GatewayConfig(listen="localhost:8080", token=False).address() == ("127.0.0.1", 8080)
