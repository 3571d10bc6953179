"""The TOML p2pfed writes reads back with tomllib to the same values, whatever they hold."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfed.config import (
    NodeConfig,
    default_config_text,
    parse_config,
    task_table_text,
)
from p2pfed.errors import ConfigError
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.run import _config_text
from p2pfed.tomlfile import toml_line, toml_value

AWKWARD = [
    'say "hi"',
    "C:\\Users\\me\\data",
    "ends with a backslash \\",
    '\\"',
    "tab\there, newline\nthere, bell\x07, delete\x7f",
    '\'single\' and """triple""" quotes',
    "unicode: é ∑ 🙂",
    "",
]

scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
)


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_strings_round_trip(text: str) -> None:
    assert tomllib.loads(toml_line("v", text))["v"] == text


@given(st.lists(scalars, max_size=5) | scalars)
def test_any_value_round_trips(value: Any) -> None:
    assert tomllib.loads(toml_line("v", value))["v"] == value


def test_arrays_stay_on_one_line_so_a_commented_example_can_be_uncommented() -> None:
    assert toml_value(["a", 1, [2.5, False]]) == '["a", 1, [2.5, false]]'
    assert toml_value(()) == "[]"
    assert toml_value(Path("/tmp/x y")) == '"/tmp/x y"'


def test_tables_and_other_objects_are_refused() -> None:
    for bad in ({"a": 1}, None, b"bytes", object()):
        with pytest.raises(TypeError):
            toml_value(bad)


@pytest.mark.parametrize("text", AWKWARD)
def test_task_settings_with_quotes_and_backslashes_round_trip(text: str) -> None:
    settings = {"data_dir": text, "paths": [text, text + "x"], "lr": 0.05}
    config = parse_config("mdns = false\n" + task_table_text("pkg.mod:task", settings))
    assert config.task == "pkg.mod:task"
    assert config.task_settings == settings


def test_task_settings_that_toml_cannot_hold_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="only booleans, numbers, strings and lists"):
        task_table_text("pkg.mod:task", {"bad": {"nested": 1}})


def test_default_config_still_parses_to_the_defaults() -> None:
    assert parse_config(default_config_text()) == NodeConfig()


@pytest.mark.parametrize("text", AWKWARD)
def test_run_config_text_round_trips(text: str) -> None:
    # The task name is validated when a node loads the file, but the writer must not be
    # the part that breaks: whatever it is given, it writes valid TOML holding exactly that.
    doc = tomllib.loads(_config_text(7447, [text, "127.0.0.1:1"], True, text, None))
    assert doc == {
        "listen_host": "127.0.0.1",
        "listen_port": 7447,
        "bootstrap": [text, "127.0.0.1:1"],
        "mdns": True,
        "mdns_interfaces": ["127.0.0.1"],
        "task": text,
    }
    with_table = tomllib.loads(_config_text(1, [], False, "pkg.mod:task", {"dir": text}))
    assert with_table["task"] == {"name": "pkg.mod:task", "dir": text}
    assert with_table["mdns"] is False and with_table["bootstrap"] == []


def test_federation_file_keeps_its_comments_and_round_trips() -> None:
    params = ProtocolParams(dp_epsilon_budget=0.1 + 0.2)
    fed = Federation.new("lab-1", params=params)
    text = fed.to_toml()
    assert Federation.from_toml(text) == fed
    assert "# It contains the federation SECRET" in text
    assert f"secret = {toml_value(fed.secret.hex())}" in text.splitlines()
    # the float is written exactly, not rounded to a short decimal
    assert tomllib.loads(text)["params"]["dp_epsilon_budget"] == 0.1 + 0.2
