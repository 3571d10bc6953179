"""Test vectors of the privacy accountant and the ledger file (spec/privacy.md).

``verify`` recomputes everything without p2pfed's accountant: it rebuilds the order grid
from the decimal rule of the spec, evaluates the conversion formula with ``math.log`` order
by order, inverts it with the closed form ``z = min over alpha of sqrt(T alpha / (2 (eps -
c(alpha))))``, and re-hashes the ledger file body.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math

from p2pfed.accountant import DEFAULT_ORDERS, RdpAccountant, noise_multiplier_for
from p2pfed.ledger import encode_ledger_file

NAME = "privacy"
SECTION = 'spec/privacy.md, "Accountant" and "Ledger file format"'
DESCRIPTION = "RDP order grid, epsilon of Gaussian releases, the inverse, a ledger file"

_ZS = (0.5, 1.0, 2.0, 5.0, 10.0)
_RELEASES = (1, 10, 100, 1000)
_DELTAS = (1e-3, 1e-5, 1e-7)
_MIXED = (
    ((1.0, 10), (2.0, 5)),
    ((0.7, 3), (4.0, 100), (16.0, 1000)),
)
_INVERSE = ((0.5, 1, 1e-5), (1.0, 1, 1e-5), (1.0, 100, 1e-6), (8.0, 1000, 1e-5), (3.0, 10, 1e-3))
_LEDGER_BUDGET = 8.0
_LEDGER_DELTA = 1e-5
# (round, noise multiplier); round 2 released twice (a regroup that drew fresh noise)
_LEDGER_RELEASES = ((0, 5.0), (1, 5.0), (2, 5.0), (2, 7.5), (3, 5.0))
_EPSILON_DIGITS = 12  # a vector holds 12 significant digits: robust to last-bit libm drift
_Z_DIGITS = 10


def _round(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def _epsilon(groups: tuple[tuple[float, int], ...], delta: float) -> tuple[float, float]:
    acc = RdpAccountant()
    for z, count in sorted(groups):
        acc.add_gaussian(z, count)
    return acc.epsilon(delta)


def generate() -> dict:
    single = []
    for z, releases, delta in itertools.product(_ZS, _RELEASES, _DELTAS):
        eps, order = _epsilon(((z, releases),), delta)
        single.append(
            {
                "noise_multiplier": z,
                "releases": releases,
                "delta": delta,
                "epsilon": _round(eps, _EPSILON_DIGITS),
                "best_order": order,
            }
        )
    mixed = []
    for mix in _MIXED:
        eps, order = _epsilon(mix, 1e-5)
        mixed.append(
            {
                "releases": [{"noise_multiplier": z, "count": n} for z, n in mix],
                "delta": 1e-5,
                "epsilon": _round(eps, _EPSILON_DIGITS),
                "best_order": order,
            }
        )
    inverse = [
        {
            "target_epsilon": target,
            "releases": releases,
            "delta": delta,
            "noise_multiplier": _round(noise_multiplier_for(target, releases, delta), _Z_DIGITS),
        }
        for target, releases, delta in _INVERSE
    ]

    groups: dict[float, int] = {}
    for _, z in _LEDGER_RELEASES:
        groups[z] = groups.get(z, 0) + 1
    spent = _epsilon(tuple(groups.items()), _LEDGER_DELTA)[0]
    ledger_bytes = encode_ledger_file(
        epsilon_budget=_LEDGER_BUDGET,
        delta=_LEDGER_DELTA,
        groups=groups,
        recent=list(_LEDGER_RELEASES),
        epsilon_spent=spent,
    )
    return {
        "orders": list(DEFAULT_ORDERS),
        "epsilon_single": single,
        "epsilon_mixed": mixed,
        "noise_multiplier_for": inverse,
        "ledger_file": {
            "epsilon_budget": _LEDGER_BUDGET,
            "delta": _LEDGER_DELTA,
            "releases": [{"round": r, "noise_multiplier": z} for r, z in _LEDGER_RELEASES],
            "file_text": ledger_bytes.decode("ascii"),
            "body_sha256": hashlib.sha256(
                ledger_bytes[len(b'{"body":') : -len(b',"sha256":""}\n') - 64]
            ).hexdigest(),
        },
    }


# -- independent re-computation -------------------------------------------------------


def _spec_orders() -> list[float]:
    """The grid as the spec writes it: decimal numbers, parsed to the nearest binary64."""
    text = [f"1.{k:02d}" for k in range(1, 100)]
    text += [f"{k // 10}.{k % 10}" for k in range(20, 200)]
    text += [str(k) for k in range(20, 257)]
    text += [str(k) for k in range(264, 1025, 8)]
    text += [str(k) for k in range(1088, 4097, 64)]
    return [float(t) for t in text]


def _direct_epsilon(inv_z2_sum: float, delta: float, orders: list[float]) -> float:
    """min over alpha of alpha*S/2 + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)."""
    best = math.inf
    for a in orders:
        eps = a * inv_z2_sum / 2 + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(0.0, best)


def _direct_inverse(target: float, releases: int, delta: float, orders: list[float]) -> float:
    best = math.inf
    for a in orders:
        c = math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if c < target:
            best = min(best, math.sqrt(releases * a / (2 * (target - c))))
    return best


def verify(vectors: dict) -> None:
    orders = _spec_orders()
    assert vectors["orders"] == orders, "order grid differs from the spec's decimal rule"
    for case in vectors["epsilon_single"]:
        s = case["releases"] / case["noise_multiplier"] ** 2
        expected = _direct_epsilon(s, case["delta"], orders)
        assert math.isclose(case["epsilon"], expected, rel_tol=1e-10), case
        a = case["best_order"]
        at_best = a * s / 2 + math.log((a - 1) / a) - (math.log(case["delta"] * a)) / (a - 1)
        assert math.isclose(at_best, expected, rel_tol=1e-10), case
    for case in vectors["epsilon_mixed"]:
        s = sum(g["count"] / g["noise_multiplier"] ** 2 for g in case["releases"])
        expected = _direct_epsilon(s, case["delta"], orders)
        assert math.isclose(case["epsilon"], expected, rel_tol=1e-10), case
    for case in vectors["noise_multiplier_for"]:
        target, releases, delta = case["target_epsilon"], case["releases"], case["delta"]
        expected = _direct_inverse(target, releases, delta, orders)
        assert math.isclose(case["noise_multiplier"], expected, rel_tol=1e-6), case

    example = vectors["ledger_file"]
    data = example["file_text"].encode("ascii")
    prefix, tail = b'{"body":', b'"}\n'
    assert data.startswith(prefix) and data.endswith(tail)
    body_bytes = data[len(prefix) : -len(b',"sha256":""}\n') - 64]
    digest = data[-len(tail) - 64 : -len(tail)].decode("ascii")
    assert hashlib.sha256(body_bytes).hexdigest() == digest == example["body_sha256"]
    body = json.loads(body_bytes)
    assert json.loads(data) == {"body": body, "sha256": digest}
    assert body["format"] == "p2pfed-privacy-ledger" and body["version"] == 1
    assert body["epsilon_budget"] == example["epsilon_budget"]
    assert body["delta"] == example["delta"]
    releases = example["releases"]
    assert body["releases"] == len(releases)
    assert body["recent"] == releases
    counts: dict[float, int] = {}
    for r in releases:
        counts[r["noise_multiplier"]] = counts.get(r["noise_multiplier"], 0) + 1
    assert body["by_noise_multiplier"] == [
        {"count": counts[z], "noise_multiplier": z} for z in sorted(counts)
    ]
    s = sum(1 / r["noise_multiplier"] ** 2 for r in releases)
    assert math.isclose(
        body["epsilon_spent"], _direct_epsilon(s, body["delta"], orders), rel_tol=1e-10
    )
