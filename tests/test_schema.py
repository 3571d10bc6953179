"""One validation approach (p2pfed.schema) for config, federation, scenario and status files."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pfed.cli import main
from p2pfed.config import NodeConfig, default_config_text, load_config
from p2pfed.errors import ConfigError, P2pfedError, StatusError
from p2pfed.federation import Federation, ProtocolParams, load_federation
from p2pfed.schema import Rule, rules_of
from p2pfed.status import STATUS_DOCUMENT, StatusWriter, read_status
from simnet.scenario import DpSpec, ProtocolSpec, load_scenario

# --- every file kind: unknown key, wrong type, out of range ---------------------------------


def _config(tmp_path: Path, line: str) -> tuple[Path, Callable[[], object]]:
    (tmp_path / "config.toml").write_text(f"listen_port = 7447\n{line}\n")
    return tmp_path / "config.toml", lambda: load_config(tmp_path)


def _federation(tmp_path: Path, line: str) -> tuple[Path, Callable[[], object]]:
    text = Federation.new("lab").to_toml()
    key = line.split(" =")[0]
    text = re.sub(rf"(?m)^{key} = .*$", "", text).replace("[params]\n", f"[params]\n{line}\n")
    path = tmp_path / "federation.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path, lambda: load_federation(path)


def _scenario(tmp_path: Path, line: str) -> tuple[Path, Callable[[], object]]:
    path = tmp_path / "run.toml"
    path.write_text(f"{line}\n[nodes]\ncount = 4\n")
    return path, lambda: load_scenario(path)


def _status(tmp_path: Path, line: str) -> tuple[Path, Callable[[], object]]:
    writer = StatusWriter(tmp_path, node_id="n", wall_clock=lambda: 0.0)
    writer.flush(0.0)
    doc = json.loads((tmp_path / "status.json").read_text())
    key, value = line.split(" = ")
    doc[key] = json.loads(value)
    (tmp_path / "status.json").write_text(json.dumps(doc))
    return tmp_path / "status.json", lambda: read_status(tmp_path)


KINDS = {"config": _config, "federation": _federation, "scenario": _scenario, "status": _status}

# (kind, line written into the file, key the error must name, words of the fix)
CASES = [
    ("config", "listen_prot = 9000", "listen_prot", "did you mean listen_port?"),
    ("config", 'max_connections = "64"', "max_connections", "must be an integer, got '64'"),
    ("config", "max_connections = 0", "max_connections", "must be between 1 and 65535"),
    ("federation", "group_size = 4", "group_size", "did you mean group_min?"),
    ("federation", 'dp_delta = "small"', "dp_delta", "must be a number, got 'small'"),
    ("federation", "dp_delta = 1.5", "dp_delta", "must be strictly between 0 and 1"),
    ("scenario", "seeds = 3", "seeds", "did you mean seed?"),
    ("scenario", "[churn]\nfraction = true", "[churn] fraction", "must be a number, got True"),
    ("scenario", "[churn]\nfraction = 2.0", "[churn] fraction", "must be in [0, 1]"),
    ("status", 'colour = "red"', "colour", "allowed keys are: schema, pid"),
    ("status", 'round = "3"', "round", "must be an integer, got '3'"),
    ("status", "round = -3", "round", "must be at least 0"),
]


@pytest.mark.parametrize(("kind", "line", "key", "fix"), CASES, ids=lambda v: str(v)[:24])
def test_each_file_kind_rejects_bad_keys_in_one_line_naming_file_key_and_fix(
    tmp_path: Path, kind: str, line: str, key: str, fix: str
) -> None:
    path, load = KINDS[kind](tmp_path, line)
    with pytest.raises(P2pfedError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert key in message
    assert fix in message


def test_valid_files_of_each_kind_load(tmp_path: Path) -> None:
    # the helpers above write valid files when the line is valid: the errors are the line's
    for kind, line in [
        ("config", "max_connections = 8"),
        ("federation", "dp_delta = 1e-6"),
        ("scenario", "[churn]\nfraction = 0.5"),
        ("status", "round = 3"),
    ]:
        directory = tmp_path / kind
        directory.mkdir()
        _, load = KINDS[kind](directory, line)
        load()


def test_the_command_line_prints_the_error_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = _federation(tmp_path, "dp_delta = 1.5")
    assert main(["federation", "show", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"p2pfed: error: {path}: ")
    assert "dp_delta must be strictly between 0 and 1, got 1.5" in err
    _status(tmp_path, "round = -3")
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2pfed: error: ")
    assert "round must be at least 0, got -3 (written by another p2pfed version?" in err


# --- declared once ------------------------------------------------------------------------


def test_help_of_config_keys_and_params_comes_from_their_declaration() -> None:
    text = default_config_text()
    for name, rule in rules_of(NodeConfig).items():
        if name not in ("task", "task_settings"):
            assert rule.help and rule.help.splitlines()[0] in text, name
    fed = Federation.new("lab").to_toml()
    for name, rule in rules_of(ProtocolParams).items():
        assert f"# {rule.help}\n{name} = " in fed


def test_defaults_are_the_dataclass_defaults() -> None:
    assert NodeConfig().listen_port == NodeConfig.listen_port == 7447
    assert ProtocolParams().dp_delta == ProtocolParams.dp_delta == 1e-5
    assert ProtocolSpec().keepalive_interval == NodeConfig.keepalive_interval


def test_a_key_two_files_share_is_checked_by_one_rule() -> None:
    assert rules_of(DpSpec)["delta"] is rules_of(ProtocolParams)["dp_delta"]
    assert rules_of(ProtocolSpec)["idle_timeout"] is rules_of(NodeConfig)["idle_timeout"]
    with pytest.raises(ValueError, match="delta: must be strictly between 0 and 1"):
        DpSpec(delta=0.0)
    with pytest.raises(ConfigError, match="dp_delta must be strictly between 0 and 1"):
        ProtocolParams(dp_delta=0.0)


def test_status_writer_and_reader_share_the_declaration(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path, node_id="n", wall_clock=lambda: 0.0)
    writer.update(0.0, round=2, accuracy=math.nan)
    assert list(read_status(tmp_path)) == STATUS_DOCUMENT.keys()
    assert read_status(tmp_path)["accuracy"] is None  # "not measured" is null
    with pytest.raises(ValueError, match="status field 'round' must be at least 0, got -1"):
        writer.update(0.0, round=-1)
    doc = json.loads((tmp_path / "status.json").read_text())
    (tmp_path / "status.json").write_text(json.dumps({**doc, "round": -1}))
    with pytest.raises(StatusError, match=r"status\.json: round must be at least 0, got -1"):
        read_status(tmp_path)


# --- the rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "value", "problem"),
    [
        (Rule("int", low=0, high=9), True, "must be an integer, got True"),
        (Rule("int", low=0, high=9), 10, "must be between 0 and 9, got 10"),
        (Rule("int", low=3, why="why not"), 2, "must be at least 3 (why not), got 2"),
        (Rule("float", low=0, low_open=True), 0.0, "must be > 0, got 0.0"),
        (Rule("float", low=0, low_open=True, unit="seconds"), math.inf, "positive number of"),
        (Rule("float", low=0), math.inf, "must be a finite number, got inf"),
        (Rule("float", low=0), math.nan, "must be a finite number, got nan"),
        (Rule("float", low=0, high=1, high_open=True), 1, "must be in [0, 1), got 1"),
        (Rule("float", low=0, high=1, low_open=True, high_open=True), 1, "strictly between"),
        (Rule("bool"), 1, "must be true or false, got 1"),
        (Rule("str", choices=("a", "b", "c")), "d", 'must be "a", "b" or "c", got \'d\''),
        (Rule("str"), 3, "must be a string, got 3"),
        (Rule("strs"), "a", "must be a list of strings, got 'a'"),
        (Rule("strs"), ["a", 1], "but contains 1"),
        (Rule("ints", low=0, high=5), [1, 6], "integers between 0 and 5, but contains 6"),
        (Rule("path"), "", "must be a path, got ''"),
        (Rule("table"), [1], "must be a table, got [1]"),
    ],
)
def test_rule_problems_say_what_is_accepted(rule: Rule, value: Any, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        rule.convert(value)
    assert problem in str(info.value)


def test_rules_normalise_and_accept_declared_infinity() -> None:
    assert Rule("float", low=0, high=math.inf).convert(math.inf) == math.inf
    assert Rule("float").convert(8) == 8.0 and isinstance(Rule("float").convert(8), float)
    assert Rule("strs").convert(["a"]) == ("a",)
    assert Rule("path").convert("f.toml") == Path("f.toml")
    assert Rule("int", optional=True).convert(None) is None
    assert Rule("str", check=str.upper).convert("x") == "X"
