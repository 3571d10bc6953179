"""The command line, run in-process through main() and once as a real subprocess."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import p2pfed
from p2pfed import cli
from p2pfed.config import NodeConfig, load_config
from p2pfed.federation import Federation, load_federation
from p2pfed.identity import NodeId, load_identity

REPO_ROOT = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_version_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "p2pfed", "--version"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"p2pfed {p2pfed.__version__}\n"


def test_user_error_subprocess_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "p2pfed", "id", str(tmp_path / "missing")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("p2pfed: error: ")
    assert "Traceback" not in result.stderr


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"p2pfed {p2pfed.__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: p2pfed" in capsys.readouterr().err


COMMANDS = [
    "init",
    "id",
    "federation",
    "status",
    "node",
    "run",
    "demo",
    "export",
    "conformance",
    "simnet",
]


def test_help_exits_zero_and_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    # argparse indents each subcommand's name by 4 spaces under "COMMAND"
    listed = re.findall(r"^    (\w+)(?:  |$)", out, flags=re.MULTILINE)
    assert listed == COMMANDS
    for command in COMMANDS:
        assert cli.main([command, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: p2pfed {command} ")


def test_init_creates_private_node_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = tmp_path / "node"
    assert cli.main(["init", str(node)]) == 0
    out = capsys.readouterr().out
    assert _mode(node) == 0o700
    assert _mode(node / "identity.key") == 0o600
    identity = load_identity(node / "identity.key")
    assert str(identity.node_id) in out
    assert identity.node_id.short in out
    assert "federation.toml" in out  # next steps
    assert load_config(node) == NodeConfig()


def test_init_twice_refuses_and_force_replaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node"
    assert cli.main(["init", str(node)]) == 0
    first = load_identity(node / "identity.key").node_id
    capsys.readouterr()

    assert cli.main(["init", str(node)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("p2pfed: error: ")
    assert str(node / "identity.key") in err
    assert "--force" in err
    assert "id would change" in err
    assert load_identity(node / "identity.key").node_id == first

    assert cli.main(["init", "--force", str(node)]) == 0
    second = load_identity(node / "identity.key").node_id
    assert second != first
    assert str(second) in capsys.readouterr().out
    assert _mode(node / "identity.key") == 0o600


def test_init_keeps_existing_config(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir(mode=0o700)
    (node / "config.toml").write_text("listen_port = 1234\n")
    assert cli.main(["init", str(node)]) == 0
    assert load_config(node).listen_port == 1234


def test_init_uses_p2pfed_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("P2PFED_HOME", str(home))
    assert cli.main(["init"]) == 0
    assert (home / "identity.key").exists()
    capsys.readouterr()
    assert cli.main(["id"]) == 0
    assert capsys.readouterr().out.strip() == str(load_identity(home / "identity.key").node_id)


def test_init_on_a_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    assert cli.main(["init", str(path)]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_id_prints_node_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = tmp_path / "node"
    cli.main(["init", str(node)])
    capsys.readouterr()
    assert cli.main(["id", str(node)]) == 0
    text = capsys.readouterr().out.strip()
    assert NodeId.parse(text) == load_identity(node / "identity.key").node_id
    assert cli.main(["id", "--short", str(node)]) == 0
    assert capsys.readouterr().out.strip() == text[:10]


def test_id_with_loose_key_permissions_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node"
    cli.main(["init", str(node)])
    os.chmod(node / "identity.key", 0o644)
    capsys.readouterr()
    assert cli.main(["id", str(node)]) == 1
    err = capsys.readouterr().err
    assert "chmod 600" in err
    assert "Traceback" not in err


def test_id_missing_says_run_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["id", str(tmp_path)]) == 1
    assert "p2pfed init" in capsys.readouterr().err


def test_federation_new_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["federation", "new", "lab"]) == 0
    captured = capsys.readouterr()
    path = tmp_path / "lab.federation.toml"
    fed = load_federation(path)
    assert _mode(path) == 0o600
    assert fed.name == "lab"
    assert "lab.federation.toml" in captured.out
    assert fed.federation_id.hex() in captured.out
    assert fed.tag in captured.out
    assert "secret" in captured.err
    assert fed.secret.hex() not in captured.out + captured.err


def test_federation_new_output_and_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node" / "federation.toml"
    path.parent.mkdir()
    assert cli.main(["federation", "new", "lab", "-o", str(path)]) == 0
    first = load_federation(path)
    capsys.readouterr()
    assert cli.main(["federation", "new", "lab", "-o", str(path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert load_federation(path) == first
    assert cli.main(["federation", "new", "lab", "-o", str(path), "--force"]) == 0
    assert load_federation(path).federation_id != first.federation_id


def test_federation_new_record_level_defaults_that_learn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dp record picks large Poisson batches, few steps and server momentum (chosen on
    public data: python -m bench.dp_defaults) and says what it chose and what a round costs."""
    from p2pfed.dp import release_cost

    path = tmp_path / "fed.toml"
    assert cli.main(["federation", "new", "lab", "-o", str(path), "--dp", "record",
                     "--epsilon", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    params = load_federation(path).params
    assert (params.dp_level, params.dp_sample_rate, params.dp_steps) == ("record", 0.25, 2)
    assert (params.server_optimizer, params.server_momentum) == ("fedavgm", 0.9)
    cost = release_cost(params)
    assert 7.8 < cost.epsilon(100, 1e-5) <= 8.0
    per_round = f"epsilon {cost.epsilon(1, 1e-5):.3g} per round"
    assert per_round in out
    assert "2 steps a round" in out and "Poisson sample of 0.25" in out
    assert "server optimiser fedavgm, momentum 0.9" in out
    assert f"noise multiplier {params.dp_noise_multiplier:g}" in out


def test_federation_new_record_level_options_override_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    args = ["--dp", "record", "--sample-rate", "0.05", "--steps", "10", "--rounds", "20"]
    assert cli.main(["federation", "new", "lab", "-o", str(path), *args]) == 0
    params = load_federation(path).params
    assert (params.dp_sample_rate, params.dp_steps) == (0.05, 10)
    # node level keeps the file defaults of the record-level keys (they do not apply)
    node = tmp_path / "node.toml"
    assert cli.main(["federation", "new", "lab", "-o", str(node), "--dp", "node"]) == 0
    fresh = load_federation(node).params
    assert (fresh.server_optimizer, fresh.dp_steps) == ("fedavg", 50)


def test_federation_new_into_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["federation", "new", "lab", "-o", str(tmp_path / "no" / "f.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_federation_new_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["federation", "new", "../evil", "-o", str(tmp_path / "f.toml")]) == 1
    assert "invalid federation name" in capsys.readouterr().err
    assert not (tmp_path / "f.toml").exists()


def test_federation_show_never_prints_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "f.toml"
    cli.main(["federation", "new", "lab", "-o", str(path)])
    fed = load_federation(path)
    capsys.readouterr()
    assert cli.main(["federation", "show", str(path)]) == 0
    captured = capsys.readouterr()
    assert "lab" in captured.out
    assert fed.federation_id.hex() in captured.out
    assert fed.tag in captured.out
    assert "group_min" in captured.out and "dp_epsilon_budget" in captured.out
    assert fed.secret.hex() not in captured.out + captured.err


def test_federation_show_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.toml"
    path.write_text(Federation.new("lab").to_toml().replace("group_min = 3", "group_min = 2"))
    os.chmod(path, 0o600)
    assert cli.main(["federation", "show", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"p2pfed: error: {path}: ")
    assert "group_min" in err


def test_federation_without_subcommand_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["federation"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    # Handlers are looked up when the parser is built, so this stands in for a long command.
    monkeypatch.setattr(cli, "cmd_id", interrupted)
    assert cli.main(["id"]) == 130
    assert "interrupted" in capsys.readouterr().err
