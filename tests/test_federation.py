"""Federation files: creation, TOML round trip, validation, file handling."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from p2pfed.errors import ConfigError
from p2pfed.federation import Federation, ProtocolParams, load_federation, save_federation


def _fixed_randbytes(n: int) -> bytes:
    return bytes(range(n))


def test_new_uses_injected_randomness() -> None:
    fed = Federation.new("lab", _fixed_randbytes)
    assert fed.federation_id == bytes(range(16))
    assert fed.secret == bytes(range(32))
    assert fed.protocol_version == 1
    assert fed.params == ProtocolParams()


def test_two_new_federations_differ() -> None:
    a, b = Federation.new("lab"), Federation.new("lab")
    assert a.federation_id != b.federation_id
    assert a.secret != b.secret
    assert a.tag != b.tag


def test_tag_derivation() -> None:
    fed = Federation.new("lab")
    expected = hashlib.sha256(b"p2pfed-federation-tag:v1" + fed.federation_id).digest()[:8]
    assert fed.tag == expected.hex()
    assert len(fed.tag) == 16


def test_toml_round_trip_with_custom_params() -> None:
    params = ProtocolParams(
        group_min=4,
        group_max=16,
        max_message_size=65535,
        fixed_point_bits=32,
        clip=0.1,
        dp_enabled=False,
        dp_clip_norm=2.5,
        dp_noise_multiplier=0.0,
        dp_delta=1e-9,
        dp_epsilon_budget=3.3,
    )
    fed = Federation.new("my-fed_1.0", params=params)
    text = fed.to_toml()
    assert Federation.from_toml(text) == fed
    doc = tomllib.loads(text)
    assert doc["federation"]["id"] == fed.federation_id.hex()
    assert doc["federation"]["secret"] == fed.secret.hex()
    assert doc["params"]["clip"] == 0.1


def test_toml_has_a_comment_for_each_field() -> None:
    text = Federation.new("lab").to_toml()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
    assert "SECRET" in text


def test_repr_hides_secret() -> None:
    fed = Federation.new("lab")
    assert fed.secret.hex() not in repr(fed)
    assert repr(fed.secret) not in repr(fed)


def test_int_values_accepted_for_float_params() -> None:
    text = Federation.new("lab").to_toml().replace("clip = 8.0", "clip = 8")
    fed = Federation.from_toml(text)
    assert fed.params.clip == 8.0
    assert isinstance(fed.params.clip, float)


def test_missing_params_take_defaults() -> None:
    fed = Federation.new("lab")
    text = fed.to_toml().split("[params]")[0]
    assert Federation.from_toml(text) == fed


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"group_min": 2}, "group_min must be at least 3"),
        ({"group_min": 0}, "group_min must be at least 3"),
        ({"group_min": 5, "group_max": 4}, "group_max must be between group_min"),
        ({"group_max": 65}, "group_max must be between"),
        ({"group_min": 3.0}, "group_min must be an integer"),
        ({"group_min": True}, "group_min must be an integer"),
        ({"fixed_point_bits": 16}, "fixed_point_bits must be 32 or 64"),
        ({"fixed_point_bits": 128}, "fixed_point_bits must be 32 or 64"),
        ({"clip": -1.0}, "clip must be > 0"),
        ({"clip": 0.0}, "clip must be > 0"),
        ({"clip": float("inf")}, "clip must be a finite number"),
        ({"clip": float("nan")}, "clip must be a finite number"),
        ({"clip": "8"}, "clip must be a number"),
        ({"max_message_size": 1000}, "max_message_size must be between"),
        ({"max_message_size": 2**32}, "max_message_size must be between"),
        ({"dp_enabled": 1}, "dp_enabled must be true or false"),
        ({"dp_clip_norm": 0.0}, "dp_clip_norm must be > 0"),
        ({"dp_noise_multiplier": 0.0}, "dp_noise_multiplier must be > 0"),
        ({"dp_noise_multiplier": -1.0, "dp_enabled": False}, "dp_noise_multiplier"),
        ({"dp_delta": 0.0}, "dp_delta must be strictly between 0 and 1"),
        ({"dp_delta": 1.0}, "dp_delta must be strictly between 0 and 1"),
        ({"dp_epsilon_budget": -5.0}, "dp_epsilon_budget must be > 0"),
    ],
)
def test_invalid_params_rejected(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ProtocolParams(**changes)


def test_invalid_params_in_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    text = Federation.new("lab").to_toml().replace("group_min = 3", "group_min = 2")
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: .*group_min must be at least 3"
    ):
        load_federation(path)


def test_unknown_param_keys_rejected_with_allowed_list() -> None:
    text = Federation.new("lab").to_toml().replace("[params]\n", "[params]\ngroup_size = 5\n")
    with pytest.raises(ConfigError, match="group_size") as info:
        Federation.from_toml(text, source="f.toml")
    message = str(info.value)
    assert message.startswith("f.toml: ")
    for key in ProtocolParams.allowed_keys():
        assert key in message


def test_unknown_federation_keys_rejected() -> None:
    text = Federation.new("lab").to_toml().replace("[federation]\n", "[federation]\nowner = 1\n")
    with pytest.raises(ConfigError, match=r"owner.*allowed keys are: name, id, secret"):
        Federation.from_toml(text)


def test_unknown_top_level_table_rejected() -> None:
    text = Federation.new("lab").to_toml() + "\n[extra]\na = 1\n"
    with pytest.raises(ConfigError, match="unknown top-level key"):
        Federation.from_toml(text)


@pytest.mark.parametrize("key", ["name", "id", "secret", "protocol_version"])
def test_missing_federation_key_rejected(key: str) -> None:
    lines = [
        line
        for line in Federation.new("lab").to_toml().splitlines()
        if not line.startswith(f"{key} =")
    ]
    with pytest.raises(ConfigError, match=f"missing the key '{key}'"):
        Federation.from_toml("\n".join(lines), source="f.toml")


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ('id = "', 'id = "zz', "federation.id is not valid hex"),
        ('id = "', 'id = "00', "federation.id must be 16 bytes"),
        ('id = "', 'id = "0', "federation.id is not valid hex"),
        ('id = "', 'id = " ', "federation.id is not valid hex"),
        ('secret = "', 'secret = "0000', "federation.secret must be 32 bytes"),
        ('name = "lab"', 'name = "a b"', "invalid federation name"),
        ('name = "lab"', 'name = ""', "invalid federation name"),
        ('name = "lab"', "name = 5", "invalid federation name"),
        ("protocol_version = 1", "protocol_version = 2", "not supported"),
        ("protocol_version = 1", 'protocol_version = "1"', "must be an integer"),
    ],
)
def test_bad_federation_fields_rejected(old: str, new: str, fragment: str) -> None:
    text = Federation.new("lab").to_toml().replace(old, new, 1)
    with pytest.raises(ConfigError, match=fragment):
        Federation.from_toml(text, source="f.toml")


def test_uppercase_hex_accepted() -> None:
    fed = Federation.new("lab")
    text = fed.to_toml().replace(fed.secret.hex(), fed.secret.hex().upper())
    assert Federation.from_toml(text) == fed


def test_invalid_toml_rejected() -> None:
    with pytest.raises(ConfigError, match=r"f.toml: not a valid TOML file"):
        Federation.from_toml("[federation\n", source="f.toml")
    with pytest.raises(ConfigError, match="missing the \\[federation\\] table"):
        Federation.from_toml("", source="f.toml")


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 63])
def test_valid_names(name: str) -> None:
    assert Federation.new(name).name == name


@pytest.mark.parametrize("name", ["", "x" * 64, "a/b", "../x", "é", "a b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid federation name"):
        Federation.new(name)


def test_federation_is_immutable() -> None:
    fed = Federation.new("lab")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fed.name = "other"  # type: ignore[misc]


# --- files ------------------------------------------------------------------------------------


def test_save_load_round_trip_mode_0600(tmp_path: Path) -> None:
    fed = Federation.new("lab")
    path = tmp_path / "lab.federation.toml"
    save_federation(path, fed)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_federation(path) == fed


def test_save_refuses_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    first = Federation.new("lab")
    save_federation(path, first)
    with pytest.raises(ConfigError, match=r"already exists.*--force"):
        save_federation(path, Federation.new("lab"))
    assert load_federation(path) == first
    second = Federation.new("lab")
    save_federation(path, second, force=True)
    assert load_federation(path) == second


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no federation file.*federation new"):
        load_federation(tmp_path / "federation.toml")


def test_load_world_readable_file_warns_but_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f.toml"
    fed = Federation.new("lab")
    save_federation(path, fed)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="p2pfed.federation"):
        assert load_federation(path) == fed
    assert f"chmod 600 {path}" in caplog.text


def test_load_private_file_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "f.toml"
    save_federation(path, Federation.new("lab"))
    with caplog.at_level(logging.WARNING, logger="p2pfed.federation"):
        load_federation(path)
    assert caplog.text == ""


def test_load_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_federation(path)


def test_load_huge_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    with open(path, "wb") as f:
        f.truncate(50 * 1024 * 1024)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="too large"):
        load_federation(path)
