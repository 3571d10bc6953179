"""Server optimisers: hand-computed steps, bit-identical replicas, durable state, clear errors."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from p2pfed.errors import CheckpointError, ConfigError
from p2pfed.federation import ProtocolParams
from p2pfed.server_optimizer import (
    STATE_MAGIC,
    ServerOptimizer,
    ServerOptimizerSettings,
    ServerOptimizerStateError,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def run(settings: ServerOptimizerSettings, x0: np.ndarray, averages: list[np.ndarray]) -> list:
    opt = ServerOptimizer(settings, len(x0))
    x, out = x0, []
    for a in averages:
        x = opt.step(x, a)
        out.append(x.tolist())
    return out


# Values are dyadic fractions: every intermediate result is exact, so these are
# the formulas' exact values, worked out by hand.
X0 = f32(1.0, -2.0)
AVERAGES = [f32(2.0, -1.0), f32(3.0, 0.0), f32(2.5, 1.0)]


def test_fedavg_adopts_the_average() -> None:
    settings = ServerOptimizerSettings()
    assert settings.name == "fedavg"
    opt = ServerOptimizer(settings, 2)
    result = opt.step(X0, AVERAGES[0])
    assert result.tolist() == [2.0, -1.0] and result is not AVERAGES[0]
    assert opt.momentum_vector is None and opt.second_moment is None and opt.round == 1


def test_fedavgm_by_hand() -> None:
    # beta 0.5, lr 0.5.  step 1: d = [1, 1], m = [1, 1], x = [1.5, -1.5]
    # step 2: d = [1.5, 1.5], m = 0.5*[1, 1] + d = [2, 2], x = [2.5, -0.5]
    # step 3: d = [0, 1.5], m = [1, 1] + d = [1, 2.5], x = [3, 0.75]
    settings = ServerOptimizerSettings(name="fedavgm", lr=0.5, momentum=0.5)
    assert run(settings, X0, AVERAGES) == [[1.5, -1.5], [2.5, -0.5], [3.0, 0.75]]


def test_fedadam_by_hand() -> None:
    # b1 0.5, b2 0.75, tau 0.5, lr 0.5; x = [1], averages 2, 3, 3.
    # step 1: d = 1; m = 0.5; v = 0.25 * 1 = 0.25; x = 1 + 0.25 / (0.5 + 0.5) = 1.25
    # step 2: d = 1.75; m = 0.25 + 0.875 = 1.125; v = 0.1875 + 0.25 * 3.0625 = 0.953125;
    #         sqrt(v) is not exact: x = 1.25 + 0.5625 / (sqrt(0.953125) + 0.5)
    # step 3: d = 3 - x2 ...
    settings = ServerOptimizerSettings(name="fedadam", lr=0.5, momentum=0.5, beta2=0.75, tau=0.5)
    opt = ServerOptimizer(settings, 1)
    x1 = opt.step(f32(1.0), f32(2.0))
    assert x1.tolist() == [1.25]
    assert opt.momentum_vector.tolist() == [0.5]  # type: ignore[union-attr]
    assert opt.second_moment.tolist() == [0.25]  # type: ignore[union-attr]
    x2 = opt.step(x1, f32(3.0))
    assert opt.momentum_vector.tolist() == [1.125]  # type: ignore[union-attr]
    assert opt.second_moment.tolist() == [0.953125]  # type: ignore[union-attr]
    # binary64 arithmetic, rounded to float32 once at the end
    assert x2[0] == np.float32(1.25 + 0.5625 / (math.sqrt(0.953125) + 0.5))
    assert x2[0] == pytest.approx(1.25 + 0.5625 / (0.953125**0.5 + 0.5), rel=1e-6)
    x3 = opt.step(x2, f32(3.0))
    d = 3.0 - float(x2[0])
    m = 0.5 * 1.125 + 0.5 * d
    v = 0.75 * 0.953125 + 0.25 * d * d
    assert x3[0] == pytest.approx(float(x2[0]) + 0.5 * m / (v**0.5 + 0.5), rel=1e-6)
    assert opt.round == 3


def reference(settings: ServerOptimizerSettings, x0: np.ndarray, averages: list) -> list:
    """The spec's operations one scalar at a time in Python floats (binary64), written
    independently, each new model rounded to float32 once."""
    lr, b1, b2, tau = settings.lr, settings.momentum, settings.beta2, settings.tau
    c1, c2 = 1.0 - b1, 1.0 - b2
    xs = [float(v) for v in x0]
    m = [0.0] * len(xs)
    v = [0.0] * len(xs)
    out = []
    for a in averages:
        new = []
        for i, (x, ai) in enumerate(zip(xs, a, strict=True)):
            d = float(ai) - x
            if settings.name == "fedavgm":
                m[i] = b1 * m[i] + d
                new.append(float(np.float32(float(ai) - (d - lr * m[i]))))
            else:
                m[i] = b1 * m[i] + c1 * d
                v[i] = b2 * v[i] + c2 * (d * d)
                new.append(float(np.float32(x + (lr * m[i]) / (math.sqrt(v[i]) + tau))))
        xs = new
        out.append(np.array(xs, dtype=np.float32))
    return out


@pytest.mark.parametrize(
    "settings",
    [
        ServerOptimizerSettings(name="fedavgm", lr=1.0, momentum=0.9),
        ServerOptimizerSettings(name="fedavgm", lr=0.7, momentum=0.3),
        ServerOptimizerSettings(name="fedadam", lr=0.05),
        ServerOptimizerSettings(name="fedadam", lr=0.1, momentum=0.8, beta2=0.999, tau=1e-2),
    ],
)
def test_vectorised_code_matches_the_specs_scalar_binary64_order(
    settings: ServerOptimizerSettings,
) -> None:
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal(64).astype(np.float32)
    averages = [(x0 + rng.standard_normal(64) * 0.1).astype(np.float32) for _ in range(4)]
    opt = ServerOptimizer(settings, 64)
    x = x0
    for got, want in zip(
        [x := opt.step(x, a) for a in averages], reference(settings, x0, averages), strict=True
    ):
        assert got.dtype == np.float32
        assert got.tobytes() == want.tobytes()


def test_fedavgm_with_lr_1_and_no_momentum_is_fedavg_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    settings = ServerOptimizerSettings(name="fedavgm", lr=1.0, momentum=0.0)
    opt = ServerOptimizer(settings, 1000)
    x = rng.standard_normal(1000).astype(np.float32) * 100
    for scale in (1e-3, 1.0, 1e4):  # averages far from x: a - x is rounded
        average = (rng.standard_normal(1000) * scale).astype(np.float32)
        plain = ServerOptimizer(ServerOptimizerSettings(), 1000).step(x, average)
        x = opt.step(x, average)
        assert x.tobytes() == plain.tobytes() == average.tobytes()


def test_two_replicas_fed_the_same_inputs_stay_bit_identical() -> None:
    rng = np.random.default_rng(3)
    settings = ServerOptimizerSettings(name="fedadam", lr=0.03)
    one, two = ServerOptimizer(settings, 500), ServerOptimizer(settings, 500)
    x1 = x2 = rng.standard_normal(500).astype(np.float32)
    for _ in range(20):
        average = (x1 + rng.standard_normal(500) * 0.01).astype(np.float32)
        x1, x2 = one.step(x1, average), two.step(x2, average.copy())
        assert x1.tobytes() == x2.tobytes()
    assert one.encode() == two.encode()


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_save_and_load_continue_bit_identically(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(5)
    settings = ServerOptimizerSettings(name=name, lr=0.1 if name == "fedadam" else 1.0)
    path = tmp_path / "server-optimizer.state"
    assert ServerOptimizer.load(path, 100) is None
    uninterrupted = ServerOptimizer(settings, 100)
    x = rng.standard_normal(100).astype(np.float32)
    averages = [(x + rng.standard_normal(100) * 0.1).astype(np.float32) for _ in range(6)]
    y = x
    for a in averages[:3]:
        x = uninterrupted.step(x, a, round=uninterrupted.round + 1)
        y = x
    uninterrupted.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    restarted = ServerOptimizer.load(path, 100, settings)
    assert restarted is not None and restarted.round == 3 and restarted.name == name
    assert ServerOptimizer.load(path, 100).settings == settings  # type: ignore[union-attr]
    for a in averages[3:]:
        x, y = uninterrupted.step(x, a), restarted.step(y, a)
        assert x.tobytes() == y.tobytes()
    assert restarted.round == 6
    assert restarted.encode() == uninterrupted.encode()


def test_state_file_layout(tmp_path: Path) -> None:
    settings = ServerOptimizerSettings(name="fedavgm", lr=1.0, momentum=0.5)
    opt = ServerOptimizer(settings, 2, round=41)
    opt.step(f32(0.0, 0.0), f32(1.0, -1.0))
    data = opt.encode()
    assert data[:8] == STATE_MAGIC and data[8:10] == b"\x00\x02"
    assert data[10:18] == b"fedavgm\x00"
    assert data[50:58] == (42).to_bytes(8, "big") and data[58:66] == (2).to_bytes(8, "big")
    assert data[66] == 1
    assert np.frombuffer(data[67:83], "<f8").tolist() == [1.0, -1.0]
    assert data[-32:] == hashlib.sha256(data[:-32]).digest() and len(data) == 67 + 16 + 32


def test_version_1_state_files_are_widened_exactly(tmp_path: Path) -> None:
    # a float32 state written before the arithmetic became binary64 (spec section 6)
    header = struct.pack(
        ">8sH8s4dQQB", STATE_MAGIC, 1, b"fedavgm\x00", 1.0, 0.5, 0.99, 1e-3, 9, 2, 1
    )
    body = header + np.array([0.1, -3.0], dtype="<f4").tobytes()
    path = tmp_path / "state"
    path.write_bytes(body + hashlib.sha256(body).digest())
    opt = ServerOptimizer.load(path, 2)
    assert opt is not None and opt.round == 9
    assert opt.momentum_vector.dtype == np.float64  # type: ignore[union-attr]
    assert opt.momentum_vector.tolist() == [float(np.float32(0.1)), -3.0]  # type: ignore[union-attr]
    opt.save(path)
    assert path.read_bytes()[8:10] == b"\x00\x02"


def test_round_bookkeeping_and_reset() -> None:
    opt = ServerOptimizer(ServerOptimizerSettings(name="fedadam", lr=0.1), 3)
    opt.step(f32(0, 0, 0), f32(1, 1, 1), round=10)
    assert opt.round == 10 and opt.second_moment.any()  # type: ignore[union-attr]
    opt.step(f32(0, 0, 0), f32(1, 1, 1))
    assert opt.round == 11
    opt.reset(7)
    assert opt.round == 7 and not opt.momentum_vector.any()  # type: ignore[union-attr]
    assert not opt.second_moment.any()  # type: ignore[union-attr]


def test_settings_from_federation_parameters() -> None:
    assert ServerOptimizerSettings.from_params({}) == ServerOptimizerSettings()
    settings = ServerOptimizerSettings.from_params(
        {"server_optimizer": "fedadam", "server_lr": 0.05, "server_tau": 1, "group_min": 3}
    )
    assert (settings.name, settings.lr, settings.tau, settings.momentum) == (
        "fedadam",
        0.05,
        1.0,
        0.9,
    )
    assert ServerOptimizerSettings.from_params(settings.as_params()) == settings
    params = ProtocolParams()
    if hasattr(params, "server_optimizer"):  # the federation wiring may land separately
        assert ServerOptimizerSettings.from_params(params) == ServerOptimizerSettings()
        assert ServerOptimizerSettings.from_params(params.as_dict()) == ServerOptimizerSettings()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "sgd"}, "server_optimizer must be one of fedavg, fedavgm, fedadam"),
        ({"lr": 0.0}, "server_lr must be a finite number > 0"),
        ({"lr": float("inf")}, "server_lr must be a finite number > 0"),
        ({"lr": float("nan")}, "server_lr must be a finite number > 0"),
        ({"lr": "1"}, "server_lr must be a number, got str"),
        ({"momentum": 1.5}, "server_momentum must be in [0, 1), got 1.5"),
        ({"momentum": -0.1}, "server_momentum must be in [0, 1)"),
        ({"momentum": float("nan")}, "server_momentum must be in [0, 1), got nan"),
        ({"beta2": 1.0}, "server_beta2 must be in [0, 1), got 1.0"),
        ({"tau": 0}, "server_tau must be a finite number > 0"),
        ({"tau": True}, "server_tau must be a number, got bool"),
    ],
)
def test_bad_settings_say_what_to_fix(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerOptimizerSettings(**values)
    assert message in str(info.value)


def test_bad_inputs_to_step() -> None:
    opt = ServerOptimizer(ServerOptimizerSettings(name="fedavgm"), 2)
    with pytest.raises(TypeError, match="float32"):
        opt.step(np.zeros(2), f32(1, 1))
    with pytest.raises(ValueError, match="3 values"):
        opt.step(f32(0, 0), f32(1, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        opt.step(f32(0, 0), f32(1, np.nan))
    assert opt.round == 0 and not opt.momentum_vector.any()  # type: ignore[union-attr]


def saved(tmp_path: Path, name: str = "fedadam", size: int = 4) -> Path:
    opt = ServerOptimizer(ServerOptimizerSettings(name=name, lr=0.1), size)
    opt.step(np.zeros(size, np.float32), np.ones(size, np.float32))
    path = tmp_path / "state"
    opt.save(path)
    return path


def test_corrupt_or_mismatched_state_files_are_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    good = path.read_bytes()

    def refused(data: bytes, message: str, size: int = 4, **kw: object) -> None:
        path.write_bytes(data)
        with pytest.raises(ServerOptimizerStateError) as info:
            ServerOptimizer.load(path, size, **kw)  # type: ignore[arg-type]
        assert message in str(info.value) and str(path) in str(info.value)
        assert "Move it aside" in str(info.value) or "move it aside" in str(info.value)
        assert isinstance(info.value, CheckpointError)

    flipped = bytearray(good)
    flipped[70] ^= 1
    refused(bytes(flipped), "checksum mismatch")
    refused(good[:-5], "checksum mismatch")
    refused(good[:40], "truncated")
    refused(b"PK\x03\x04" + good[4:], "does not start with the state magic")
    refused(good[:8] + b"\x00\x03" + good[10:], "format version 3")
    refused(good + b"x" * 1000, "more than any state")
    path.write_bytes(good)
    with pytest.raises(ServerOptimizerStateError, match="4 parameters, this node's model has 5"):
        ServerOptimizer.load(path, 5)
    other = ServerOptimizerSettings(name="fedavgm")
    with pytest.raises(ServerOptimizerStateError, match="state of fedadam, but the federation"):
        ServerOptimizer.load(path, 4, other)
    # a hand-edited file with a matching checksum is still checked field by field
    body = bytearray(good[:-32])
    body[10:18] = b"adamw\x00\x00\x00"
    refused(bytes(body) + hashlib.sha256(body).digest(), "unknown optimiser name")
    body = bytearray(good[:-32])
    body[66] = 1
    refused(bytes(body) + hashlib.sha256(body).digest(), "fedadam keeps 2 state vectors")
    body = bytearray(good[:-32])
    body[-8:] = np.float64(-1.0).astype("<f8").tobytes()
    refused(bytes(body) + hashlib.sha256(body).digest(), "negative second moment")
    # a directory is not a state file
    with pytest.raises(ServerOptimizerStateError, match="is a directory"):
        ServerOptimizer.load(tmp_path, 4)


def test_retuned_hyperparameters_keep_the_state(tmp_path: Path) -> None:
    path = saved(tmp_path)
    retuned = ServerOptimizerSettings(name="fedadam", lr=0.02)
    opt = ServerOptimizer.load(path, 4, retuned)
    assert opt is not None and opt.settings == retuned and opt.round == 1
    # m = (1 - b1) * d with 1 - b1 computed in binary64: 1 - 0.9, not 0.1
    assert opt.momentum_vector.tolist() == [1.0 - 0.9] * 4  # type: ignore[union-attr]
    assert 1.0 - 0.9 != 0.1
