"""Node configuration: defaults, the commented default file, validation, loading."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from p2pfed.config import (
    NodeConfig,
    default_config_text,
    default_node_dir,
    load_config,
    parse_config,
    parse_host_port,
)
from p2pfed.errors import ConfigError
from p2pfed.federation import ProtocolParams


def test_default_config_text_parses_to_defaults() -> None:
    assert parse_config(default_config_text()) == NodeConfig()


def test_default_config_text_mentions_every_key_with_an_explanation() -> None:
    lines = default_config_text().splitlines()
    for key in NodeConfig.allowed_keys():
        pattern = re.compile(rf"^(# )?{key} = ")
        matches = [i for i, line in enumerate(lines) if pattern.match(line)]
        assert len(matches) == 1, f"{key} appears {len(matches)} times"
        above = lines[matches[0] - 1]
        assert above.startswith("# ") and not re.match(r"^# \w+ = ", above), (
            f"{key} has no explanation"
        )


def test_uncommenting_the_examples_gives_valid_config() -> None:
    text = re.sub(r"^# (\w+ = )", r"\1", default_config_text(), flags=re.MULTILINE)
    config = parse_config(text)
    assert config.task == "mypackage.tasks:task"
    assert config.max_message_size is not None
    assert config.grid_position() is not None
    unset = dict(task=None, max_message_size=None, grid_side=None, grid_coordinate=None)
    assert dataclasses.replace(config, **unset) == NodeConfig()


def test_defaults() -> None:
    c = NodeConfig()
    assert (c.listen_host, c.listen_port) == ("0.0.0.0", 7447)
    assert c.federation_file == Path("federation.toml")
    assert c.bootstrap == () and c.mdns and c.mdns_interfaces == ()
    assert (c.handshake_timeout, c.keepalive_interval, c.idle_timeout, c.send_timeout) == (
        10.0,
        1.0,
        15.0,
        60.0,
    )
    assert c.max_message_size is None and c.max_connections == 64
    assert c.log_format == "text" and not c.metrics
    assert (c.metrics_host, c.metrics_port) == ("127.0.0.1", 9464)
    assert c.task is None
    hash(c)


def test_parse_full_config() -> None:
    text = """
listen_host = "127.0.0.1"
listen_port = 0
federation_file = "/etc/p2pfed/fed.toml"
bootstrap = ["10.0.0.2:7447", "[::1]:9000", "node.example:1"]
mdns = false
mdns_interfaces = ["127.0.0.1", "::1"]
handshake_timeout = 5
keepalive_interval = 1.5
idle_timeout = 6.0
send_timeout = 30
max_message_size = 1048576
max_connections = 8
log_format = "json"
metrics = true
metrics_port = 9999
metrics_host = "0.0.0.0"
task = "p2pfed.tasks.mnist:task"
"""
    c = parse_config(text)
    assert c.listen_port == 0
    assert c.bootstrap_addresses() == [("10.0.0.2", 7447), ("::1", 9000), ("node.example", 1)]
    assert c.mdns_interfaces == ("127.0.0.1", "::1")
    assert c.handshake_timeout == 5.0 and isinstance(c.handshake_timeout, float)
    assert c.federation_path("/somewhere") == Path("/etc/p2pfed/fed.toml")
    assert c.log_format == "json" and c.metrics and c.task == "p2pfed.tasks.mnist:task"


def test_relative_federation_file_resolves_against_node_dir(tmp_path: Path) -> None:
    assert NodeConfig().federation_path(tmp_path) == tmp_path / "federation.toml"


def test_lists_become_tuples() -> None:
    c = NodeConfig(bootstrap=["a:1"])  # type: ignore[arg-type]
    assert c.bootstrap == ("a:1",)


def test_unknown_key_rejected_with_allowed_list() -> None:
    with pytest.raises(ConfigError, match=r"c.toml: unknown key.*listen_prot") as info:
        parse_config("listen_prot = 1\n", source="c.toml")
    for key in NodeConfig.allowed_keys():
        assert key in str(info.value)


def test_tables_are_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config("[network]\nlisten_port = 1\n")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("listen_port", 70000, "between 0 and 65535"),
        ("listen_port", -1, "between 0 and 65535"),
        ("listen_port", "7447", "must be an integer"),
        ("listen_port", True, "must be an integer"),
        ("listen_host", "", "host name or IP address"),
        ("listen_host", "a b", "host name or IP address"),
        ("bootstrap", "10.0.0.1:7447", "list of strings"),
        ("bootstrap", ["10.0.0.1"], "not 'host:port'"),
        ("bootstrap", ["10.0.0.1:0"], "port must be a number from 1 to 65535"),
        ("bootstrap", ["10.0.0.1:x"], "port must be"),
        ("bootstrap", ["::1:7447"], "in brackets"),
        ("bootstrap", ["[nothex]:7447"], "not an IPv6 address"),
        ("bootstrap", [7447], "list of strings"),
        ("mdns", "yes", "true or false"),
        ("mdns_interfaces", ["eth0"], "not an IP address"),
        ("handshake_timeout", 0, "positive number of seconds"),
        ("idle_timeout", -3.0, "positive number of seconds"),
        ("send_timeout", float("inf"), "positive number of seconds"),
        ("send_timeout", "60", "number of seconds"),
        ("keepalive_interval", 60.0, "less than idle_timeout"),
        ("max_message_size", 10, "between 65535"),
        ("max_connections", 0, "between 1"),
        ("log_format", "xml", '"text" or "json"'),
        ("metrics", 1, "true or false"),
        ("metrics_port", 65536, "between 0 and 65535"),
        ("task", "no_colon", "package.module:object"),
        ("task", "a.b:", "package.module:object"),
        ("task", "a-b:c", "package.module:object"),
        ("federation_file", "", "must be a path"),
    ],
)
def test_invalid_values_rejected_naming_the_key(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: .*{re.escape(fragment)}"):
        NodeConfig(**{key: value})


def test_invalid_value_in_file_names_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("listen_port = 99999\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.toml'))}: listen_port: "
    ):
        load_config(tmp_path)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("listen_port = \n")
    with pytest.raises(ConfigError, match=r"config.toml: not a valid TOML file"):
        load_config(tmp_path)


def test_load_config_from_node_dir(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(default_config_text() + "\nlisten_port = 1234\n")
    with pytest.raises(ConfigError, match="not a valid TOML"):  # duplicate key
        load_config(tmp_path)
    (tmp_path / "config.toml").write_text("listen_port = 1234\nmdns = false\n")
    assert load_config(tmp_path) == NodeConfig(listen_port=1234, mdns=False)


def test_missing_config_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path) == NodeConfig()


def test_missing_node_dir_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="p2pfed init"):
        load_config(tmp_path / "nope")


def test_effective_max_message_size() -> None:
    params = ProtocolParams(max_message_size=1 << 20)
    assert NodeConfig().effective_max_message_size(params) == 1 << 20
    assert NodeConfig(max_message_size=1 << 19).effective_max_message_size(params) == 1 << 19
    with pytest.raises(ConfigError, match="exceeds the federation's max_message_size"):
        NodeConfig(max_message_size=1 << 21).effective_max_message_size(params)


def test_parse_host_port() -> None:
    assert parse_host_port("localhost:1") == ("localhost", 1)
    assert parse_host_port("[fe80::1]:65535") == ("fe80::1", 65535)
    with pytest.raises(ValueError):
        parse_host_port(":7447")
    with pytest.raises(ValueError):
        parse_host_port("[::1]7447")


def test_default_node_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PFED_HOME", str(tmp_path / "home"))
    assert default_node_dir() == tmp_path / "home"
    monkeypatch.delenv("P2PFED_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_node_dir() == tmp_path / ".p2pfed"


def test_grid_grouping_needs_side_and_coordinate_within_the_grid() -> None:
    config = parse_config("grid_side = 3\ngrid_coordinate = [0, 2]")
    position = config.grid_position()
    assert position is not None and (position.side, position.coordinate) == (3, (0, 2))
    assert NodeConfig().grid_position() is None
    for text, words in [
        ("grid_side = 3", "grid_side: is set but grid_coordinate is not"),
        ("grid_coordinate = [1]", "grid_coordinate: is set but grid_side is not"),
        ("grid_side = 3\ngrid_coordinate = [3]", "outside 0..2"),
        ("grid_side = 1\ngrid_coordinate = [0]", "grid_side: must be between 2"),
        ('grid_side = 3\ngrid_coordinate = "a"', "must be a list of integers"),
        ("grid_side = 3\ngrid_coordinate = []", "grid_coordinate:"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_config(text, "config.toml")
