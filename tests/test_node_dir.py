"""The files in ``node/`` that operators copy: they must stay true to the code.

The example config must name every key ``p2pgpu.config`` knows, with its
default, and load; the genesis example must load; the service files must keep
the promises ``node/README.md`` makes (dedicated user, data dir, sandbox,
only the libp2p port published).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from p2pgpu.config import NodeConfig, load_config
from p2pgpu.datadir import read_genesis_file
from p2pgpu.executor import DEFAULT_OLLAMA_HOST

NODE = Path(__file__).resolve().parent.parent / "node"


def test_example_config_has_every_key_with_its_default_and_loads():
    raw = tomllib.loads((NODE / "p2pgpu.toml").read_text())
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    assert set(raw) == set(fields), "node/p2pgpu.toml must list exactly the keys of p2pgpu/config.py"
    config = load_config(NODE / "p2pgpu.toml", environ={})
    assert config.data_dir == Path("/var/lib/p2pgpu")
    assert config.genesis == Path("/etc/p2pgpu/genesis.json")
    assert config.ollama_host == DEFAULT_OLLAMA_HOST
    for name, spec in fields.items():
        if name in ("data_dir", "genesis", "ollama_host"):
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        assert getattr(config, name) == default, f"{name}: the example should show the default"


def test_genesis_example_loads():
    genesis = read_genesis_file(NODE / "genesis.example.json")
    assert genesis.name == "p2pgpu-example" and len(genesis.allocations) == 3


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def test_systemd_unit_runs_sandboxed_as_its_own_user():
    unit = _directives((NODE / "p2pgpu.service").read_text())
    assert unit["User"] == ["p2pgpu"] and unit["StateDirectory"] == ["p2pgpu"]
    assert "--data-dir /var/lib/p2pgpu" in unit["ExecStart"][0] and "node run" in unit["ExecStart"][0]
    assert unit["Restart"] == ["on-failure"]
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("CapabilityBoundingSet", "")]:
        assert unit[key] == [value], key


def test_container_runs_unprivileged_and_publishes_only_the_libp2p_port():
    text = (NODE / "Containerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    users = [rest for word, *rest in instructions if word == "USER"]
    assert users and users[-1] == ["p2pgpu"]
    assert [rest for word, *rest in instructions if word == "EXPOSE"] == [["4001/tcp"]]
    assert any(word == "VOLUME" and "/var/lib/p2pgpu" in rest[0] for word, *rest in instructions)
    assert "P2PGPU_DATA_DIR=/var/lib/p2pgpu" in text
