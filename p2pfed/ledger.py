"""The privacy ledger: a node's durable record of the privacy budget it has spent.

Rules of this file (normative text: spec/privacy.md, "Budget and ledger"):

* One ledger per node, in the node directory, named :data:`LEDGER_FILE_NAME`. It is created
  once and never deleted, reset or replaced: a missing or damaged ledger is an error the
  operator must look at (:class:`~p2pfed.errors.LedgerError`), never a fresh start.
* :meth:`PrivacyLedger.record_release` writes the new state with
  :func:`~p2pfed.atomicfile.atomic_write_bytes` (temp file, fsync, rename, directory
  fsync; mode 0600) and returns only after it is on disk. Only then may the caller send
  the noisy update. A release that would take epsilon above the budget raises
  :class:`~p2pfed.errors.PrivacyBudgetExceeded` and writes nothing.
* The file stays small however long the node runs: releases are counted per distinct
  noise multiplier (and sampling rate), and only the last :data:`RECENT_RELEASES` rounds
  are kept for humans.
* A release is one Gaussian mechanism on the node's whole data (node-level DP, sampling
  rate 1), or ``steps`` steps of the Poisson-subsampled Gaussian (record-level DP-SGD,
  sampling rate below 1), or one distributed release (Skellam shares under secure
  aggregation, spec/privacy.md 2B) that carries two guarantees: a central noise multiplier
  (against observers of group sums) and a local one (against members who strip the masks).
  A ledger with only the first kind is written in format version 1, byte for byte as
  before; the first subsampled release turns it into version 2, the first distributed
  release into version 3. The budget is enforced on the central epsilon; the local epsilon
  is recorded beside it.
* Integrity: the file is ``{"body":BODY,"sha256":"HEX"}`` plus a line feed, where HEX is
  the SHA-256 of the exact bytes of BODY. The atomic rename rules out torn writes; the
  checksum catches everything else (a damaged disk block, a hand edit).

Example::

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / LEDGER_FILE_NAME
    >>> ledger = PrivacyLedger.create(path, epsilon_budget=8.0, delta=1e-5)
    >>> ledger.would_exceed(2.0)
    False
    >>> round(ledger.record_release(round=0, noise_multiplier=2.0), 4)
    2.1657
    >>> PrivacyLedger.open(path).releases()
    1
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from p2pfed.accountant import (
    DEFAULT_ORDERS,
    check_count,
    check_delta,
    check_noise_multiplier,
    check_sampling_rate,
    conversion_terms,
    integer_order_gaussian_rdp,
    sampled_gaussian_rdp,
)
from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.errors import LedgerError, PrivacyBudgetExceeded

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LEDGER_FILE_NAME",
    "MAX_LEDGER_BYTES",
    "MAX_NOISE_MULTIPLIERS",
    "READABLE_VERSIONS",
    "RECENT_RELEASES",
    "PrivacyLedger",
    "encode_ledger_file",
    "ledger_path",
]

LEDGER_FILE_NAME = "privacy-ledger.json"
"""The ledger's file name inside the node directory."""
FORMAT_NAME = "p2pfed-privacy-ledger"
FORMAT_VERSION = 3
"""The newest format this module writes; it reads 1 to 3 (spec/privacy.md, section 6)."""
READABLE_VERSIONS = (1, 2, 3)
RECENT_RELEASES = 32
"""How many of the most recent releases (round, noise multiplier) the file keeps."""
MAX_NOISE_MULTIPLIERS = 1024
"""How many distinct noise multipliers one ledger may hold (keeps the file small)."""
MAX_LEDGER_BYTES = 1 << 20
"""A ledger file larger than this is refused before it is read (a valid one is < 200 KiB)."""

_PREFIX = b'{"body":'
_SUFFIX = re.compile(rb',"sha256":"([0-9a-f]{64})"\}\n\Z')
_SUFFIX_LENGTH = len(b',"sha256":""}\n') + 64
_BODY_KEYS = frozenset(
    {
        "format",
        "version",
        "epsilon_budget",
        "delta",
        "releases",
        "by_noise_multiplier",
        "recent",
        "epsilon_spent",
    }
)
_V3_KEYS = frozenset({"skellam", "local_epsilon_spent"})
_ORDERS = np.array(DEFAULT_ORDERS, dtype=np.float64)
_CONVERSION: dict[float, np.ndarray] = {}

# A mechanism: (noise multiplier z, sampling rate q); q = 1 is the plain Gaussian.
Mechanism = tuple[float, float]
# A recent release: (round, z, q, steps).
Recent = tuple[int, float, float, int]
# A distributed release: (central z, local z), both Gaussian-equivalent at integer orders.
Distributed = tuple[float, float]
# What the file keeps of a recent release: Recent plus the local z of a distributed one.
_Row = tuple[int, float, float, int, float | None]
# Stored epsilon_spent is informational; it must agree with the recomputation up to
# float noise from another implementation's summation order.
_SPENT_TOLERANCE = 1e-9

_NEVER_DELETE = (
    "The ledger is the only record of the privacy budget this node has already spent; "
    "never delete, reset or hand-edit it, or the node would forget what it spent. "
    "Restore it from a backup if you have one. To start over deliberately (a new node "
    "whose data has never been released), use a new node directory and create a new "
    "ledger there with PrivacyLedger.create."
)


def ledger_path(node_dir: str | os.PathLike[str]) -> Path:
    """The ledger file of the node whose directory is ``node_dir``."""
    return Path(node_dir) / LEDGER_FILE_NAME


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_budget(epsilon_budget: float) -> float:
    if not _is_real(epsilon_budget):
        raise TypeError(f"epsilon_budget must be a real number, got {type(epsilon_budget)}")
    budget = float(epsilon_budget)
    if not math.isfinite(budget) or budget <= 0.0:
        raise ValueError(f"epsilon_budget must be a finite number > 0, got {budget!r}")
    return budget


@lru_cache(maxsize=64)
def _step_rdp(z: float, q: float) -> np.ndarray:
    # a subsampled step costs ~50 ms to evaluate; a node uses one or two (z, q) pairs
    rdp = sampled_gaussian_rdp(z, q, _ORDERS)
    rdp.setflags(write=False)
    return rdp


@lru_cache(maxsize=64)
def _distributed_rdp(z: float) -> np.ndarray:
    rdp = integer_order_gaussian_rdp(z, _ORDERS)
    rdp.setflags(write=False)
    return rdp


def _epsilon(
    groups: Mapping[Mechanism, int],
    delta: float,
    distributed: Mapping[Distributed, int] | None = None,
    *,
    local: bool = False,
) -> float:
    if not groups and not distributed:
        return 0.0
    rdp = np.zeros_like(_ORDERS)
    for key in sorted(groups):  # fixed order: the same floats on every reload
        rdp = rdp + groups[key] * _step_rdp(*key)
    for central, local_z in sorted(distributed or {}):
        rdp = rdp + (distributed or {})[(central, local_z)] * _distributed_rdp(
            local_z if local else central
        )
    eps = rdp + conversion_terms(_ORDERS, delta)
    return max(0.0, float(eps[int(np.argmin(eps))]))


def _version_for(
    groups: Mapping[Mechanism, int], distributed: Mapping[Distributed, int] | None = None
) -> int:
    if distributed:
        return 3
    return 1 if all(q == 1.0 for _, q in groups) else 2


def _known_row(
    entry: Mapping[str, Any],
    groups: Mapping[Mechanism, int],
    distributed: Mapping[Distributed, int],
) -> bool:
    """Whether a recent row names a mechanism the ledger counts (a distributed release has a
    number as local_noise_multiplier, sampling rate 1 and 1 step)."""
    z = float(entry["noise_multiplier"])
    local_z = entry.get("local_noise_multiplier")
    if local_z is None:
        return (z, float(entry.get("sampling_rate", 1.0))) in groups
    return (
        _is_real(local_z)
        and entry.get("sampling_rate", 1.0) == 1.0
        and entry.get("steps", 1) == 1
        and (z, float(local_z)) in distributed
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


class PrivacyLedger:
    """The privacy budget of one node: how much was allowed, how much is spent.

    Construct with :meth:`create` (once, for a new node) or :meth:`open` (every start).
    One process writes a given ledger at a time (the node owning the directory).
    """

    def __init__(
        self,
        path: Path,
        *,
        epsilon_budget: float,
        delta: float,
        groups: dict[Mechanism, int],
        recent: list[_Row],
        releases: int | None = None,
        distributed: dict[Distributed, int] | None = None,
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._path = path
        self._budget = epsilon_budget
        self._delta = delta
        self._groups = dict(groups)
        self._distributed = dict(distributed or {})
        self._recent = list(recent)
        self._releases = (
            sum(self._groups.values()) + sum(self._distributed.values())
            if releases is None
            else releases
        )
        self._spent = _epsilon(self._groups, delta, self._distributed)
        self._local_spent = _epsilon(self._groups, delta, self._distributed, local=True)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, epsilon_budget: float, delta: float
    ) -> PrivacyLedger:
        """Create a new, empty ledger at ``path`` (the file, see :func:`ledger_path`).

        Refuses with :class:`LedgerError` if anything already exists at ``path``: an existing
        ledger is never overwritten. ``epsilon_budget`` is the total epsilon the node may
        spend, at ``delta``.
        """
        budget = _check_budget(epsilon_budget)
        d = check_delta(delta)
        target = Path(path)
        if os.path.lexists(target):
            raise LedgerError(
                f"privacy ledger {target} already exists; open it with PrivacyLedger.open "
                "instead. " + _NEVER_DELETE
            )
        ledger = cls(target, epsilon_budget=budget, delta=d, groups={}, recent=[])
        ledger._write(ledger._groups, ledger._distributed, ledger._recent, 0)
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Load the ledger at ``path``; :class:`LedgerError` if missing, unreadable or corrupt."""
        target = Path(path)
        try:
            with open(target, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_LEDGER_BYTES:
                    raise LedgerError(
                        f"privacy ledger {target} is {size} bytes, more than the "
                        f"{MAX_LEDGER_BYTES} a ledger can be; it is not a p2pfed ledger or "
                        "it is damaged. " + _NEVER_DELETE
                    )
                data = f.read(MAX_LEDGER_BYTES + 1)
        except FileNotFoundError:
            raise LedgerError(
                f"privacy ledger {target} does not exist, but the ledger is expected here. "
                + _NEVER_DELETE
            ) from None
        except IsADirectoryError:
            raise LedgerError(f"privacy ledger {target} is a directory, not a file") from None
        except OSError as exc:
            raise LedgerError(
                f"privacy ledger {target} cannot be read ({exc.strerror or exc}); "
                "check its permissions and the disk"
            ) from exc
        return cls._parse(target, data)

    @classmethod
    def _parse(cls, target: Path, data: bytes) -> PrivacyLedger:
        def corrupt(what: str) -> LedgerError:
            return LedgerError(f"privacy ledger {target} is corrupt: {what}. " + _NEVER_DELETE)

        match = _SUFFIX.search(data)
        if (
            not data.startswith(_PREFIX)
            or match is None
            or len(data) < len(_PREFIX) + _SUFFIX_LENGTH
        ):
            raise corrupt("it is not a ledger file (truncated or not written by p2pfed)")
        body_bytes = data[len(_PREFIX) : len(data) - _SUFFIX_LENGTH]
        if hashlib.sha256(body_bytes).hexdigest() != match.group(1).decode("ascii"):
            raise corrupt("the SHA-256 checksum does not match the content")
        try:
            body = json.loads(body_bytes.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise corrupt(f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise corrupt("the body is not a JSON object")
        if body.get("format") != FORMAT_NAME:
            raise corrupt(f"the format field is not {FORMAT_NAME!r}")
        version = body.get("version")
        if not _is_count(version) or version not in READABLE_VERSIONS:
            raise LedgerError(
                f"privacy ledger {target} has format version {version!r}, but this p2pfed "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; use the p2pfed "
                "release that wrote it. " + _NEVER_DELETE
            )
        sampled = version >= 2
        dual = version >= 3
        entry_keys = {"noise_multiplier", "count"} | ({"sampling_rate"} if sampled else set())
        recent_keys = (
            {"round", "noise_multiplier"}
            | ({"sampling_rate", "steps"} if sampled else set())
            | ({"local_noise_multiplier"} if dual else set())
        )
        body_keys = _BODY_KEYS | _V3_KEYS if dual else _BODY_KEYS
        if set(body) != body_keys:
            raise corrupt(f"the fields are {sorted(body)}, expected {sorted(body_keys)}")
        try:
            budget = _check_budget(body["epsilon_budget"])
            delta = check_delta(body["delta"])
        except (TypeError, ValueError) as exc:
            raise corrupt(str(exc)) from None

        groups: dict[Mechanism, int] = {}
        raw_groups = body["by_noise_multiplier"]
        if not isinstance(raw_groups, list) or len(raw_groups) > MAX_NOISE_MULTIPLIERS:
            raise corrupt(
                f"by_noise_multiplier is not a list of at most {MAX_NOISE_MULTIPLIERS} entries"
            )
        previous: Mechanism = (0.0, 0.0)
        for entry in raw_groups:
            if (
                not isinstance(entry, dict)
                or set(entry) != entry_keys
                or not _is_real(entry["noise_multiplier"])
                or not _is_real(entry.get("sampling_rate", 1.0))
                or not _is_count(entry["count"])
            ):
                raise corrupt(f"bad by_noise_multiplier entry {entry!r}")
            key = (float(entry["noise_multiplier"]), float(entry.get("sampling_rate", 1.0)))
            if (
                not math.isfinite(key[0])
                or key[0] <= 0.0
                or not 0.0 < key[1] <= 1.0
                or key <= previous
                or entry["count"] < 1
            ):
                raise corrupt(
                    "by_noise_multiplier must list finite noise multipliers > 0 (and sampling "
                    "rates in (0, 1]) in increasing order with counts >= 1; found "
                    f"{entry!r}"
                )
            groups[key] = entry["count"]
            previous = key

        distributed: dict[Distributed, int] = {}
        if dual:
            raw_dist = body["skellam"]
            if not isinstance(raw_dist, list) or len(raw_dist) > MAX_NOISE_MULTIPLIERS:
                raise corrupt(f"skellam is not a list of at most {MAX_NOISE_MULTIPLIERS} entries")
            previous = (0.0, 0.0)
            for entry in raw_dist:
                if (
                    not isinstance(entry, dict)
                    or set(entry) != {"noise_multiplier", "local_noise_multiplier", "count"}
                    or not _is_real(entry["noise_multiplier"])
                    or not _is_real(entry["local_noise_multiplier"])
                    or not _is_count(entry["count"])
                ):
                    raise corrupt(f"bad skellam entry {entry!r}")
                pair = (float(entry["noise_multiplier"]), float(entry["local_noise_multiplier"]))
                if (
                    not all(math.isfinite(z) and z > 0.0 for z in pair)
                    or pair <= previous
                    or entry["count"] < 1
                ):
                    raise corrupt(
                        "skellam must list finite noise multipliers > 0 in increasing order "
                        f"with counts >= 1; found {entry!r}"
                    )
                distributed[pair] = entry["count"]
                previous = pair
            if not distributed:
                raise corrupt("version 3 is only written once a distributed release is recorded")

        total = body["releases"]
        steps = sum(groups.values())
        shared = sum(distributed.values())
        if not _is_count(total) or (
            total != steps if not sampled else not shared <= total <= steps + shared
        ):
            raise corrupt(f"releases {total!r} does not agree with the counts per noise multiplier")

        recent: list[_Row] = []
        raw_recent = body["recent"]
        if not isinstance(raw_recent, list) or len(raw_recent) > min(total, RECENT_RELEASES):
            raise corrupt(f"recent must be a list of at most min(releases, {RECENT_RELEASES})")
        for entry in raw_recent:
            if (
                not isinstance(entry, dict)
                or set(entry) != recent_keys
                or not _is_count(entry["round"])
                or entry["round"] < 0
                or not _is_real(entry["noise_multiplier"])
                or not _is_real(entry.get("sampling_rate", 1.0))
                or not _is_count(entry.get("steps", 1))
                or entry.get("steps", 1) < 1
                or not _known_row(entry, groups, distributed)
            ):
                raise corrupt(f"bad recent entry {entry!r}")
            local_z = entry.get("local_noise_multiplier")
            recent.append(
                (
                    entry["round"],
                    float(entry["noise_multiplier"]),
                    float(entry.get("sampling_rate", 1.0)),
                    entry.get("steps", 1),
                    None if local_z is None else float(local_z),
                )
            )
        if len(recent) != min(total, RECENT_RELEASES):
            raise corrupt("recent does not hold the last releases")
        if sampled and not dual and _version_for(groups) == 1:
            raise corrupt("version 2 is only written once a subsampled release is recorded")

        ledger = cls(
            target,
            epsilon_budget=budget,
            delta=delta,
            groups=groups,
            recent=recent,
            releases=total,
            distributed=distributed,
        )
        if dual:
            stored_local = body["local_epsilon_spent"]
            if not _is_real(stored_local) or not math.isclose(
                float(stored_local),
                ledger._local_spent,
                rel_tol=_SPENT_TOLERANCE,
                abs_tol=_SPENT_TOLERANCE,
            ):
                raise corrupt(
                    f"local_epsilon_spent {stored_local!r} disagrees with the releases (they "
                    f"give {ledger._local_spent!r})"
                )
        stored = body["epsilon_spent"]
        if not _is_real(stored) or not math.isclose(
            float(stored), ledger._spent, rel_tol=_SPENT_TOLERANCE, abs_tol=_SPENT_TOLERANCE
        ):
            raise corrupt(
                f"epsilon_spent {stored!r} disagrees with the releases (they give "
                f"{ledger._spent!r})"
            )
        if ledger._spent > budget * (1.0 + _SPENT_TOLERANCE):
            raise corrupt(f"epsilon spent {ledger._spent!r} is above the budget {budget!r}")
        return ledger

    # -- queries --------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def epsilon_budget(self) -> float:
        """The total epsilon this node may spend (at :attr:`delta`)."""
        return self._budget

    @property
    def delta(self) -> float:
        """The delta at which epsilon is accounted."""
        return self._delta

    def spent(self) -> float:
        """Epsilon spent so far, at :attr:`delta` (0.0 before the first release)."""
        return self._spent

    def remaining(self) -> float:
        """Budget left: ``epsilon_budget - spent()`` (never negative)."""
        return max(0.0, self._budget - self._spent)

    def releases(self) -> int:
        """How many noisy updates were recorded."""
        return self._releases

    def steps(self) -> int:
        """How many mechanism steps the releases made (DP-SGD steps; 1 per node-level release)."""
        return sum(self._groups.values())

    def recent_releases(self) -> list[tuple[int, float]]:
        """The last (up to :data:`RECENT_RELEASES`) ``(round, noise_multiplier)``, oldest first."""
        return [(row[0], row[1]) for row in self._recent]

    def last_release(self) -> Recent | None:
        """``(round, noise_multiplier, sampling_rate, steps)`` of the newest release, if any."""
        return self._recent[-1][:4] if self._recent else None

    def local_spent(self) -> float:
        """Epsilon spent against members who strip the masks of secure aggregation.

        Equal to :meth:`spent` unless distributed releases were recorded: their local
        guarantee (one noise share alone) is weaker than the central one (a group sum).
        """
        return self._local_spent

    def _with(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        steps: int,
        local_noise_multiplier: float | None,
    ) -> tuple[dict[Mechanism, int], dict[Distributed, int]]:
        z = check_noise_multiplier(noise_multiplier)
        q = check_sampling_rate(sampling_rate)
        n = check_count("steps", steps, 1)
        groups, distributed = dict(self._groups), dict(self._distributed)
        if local_noise_multiplier is None:
            if q == 1.0 and n != 1:
                raise ValueError("a release without subsampling (sampling_rate 1) is one step")
            groups[(z, q)] = groups.get((z, q), 0) + n
            return groups, distributed
        if q != 1.0 or n != 1:
            raise ValueError("a distributed release has sampling_rate 1 and one step")
        pair = (z, check_noise_multiplier(local_noise_multiplier))
        distributed[pair] = distributed.get(pair, 0) + 1
        return groups, distributed

    def epsilon_after(
        self,
        noise_multiplier: float,
        sampling_rate: float = 1.0,
        steps: int = 1,
        local_noise_multiplier: float | None = None,
    ) -> float:
        """Epsilon that would be spent after one more release with noise multiplier ``z``
        (``steps`` Poisson-subsampled steps at ``sampling_rate``, for DP-SGD; with
        ``local_noise_multiplier``, a distributed release whose central ``z`` this is)."""
        groups, distributed = self._with(
            noise_multiplier, sampling_rate, steps, local_noise_multiplier
        )
        return _epsilon(groups, self._delta, distributed)

    def would_exceed(
        self,
        noise_multiplier: float,
        sampling_rate: float = 1.0,
        steps: int = 1,
        local_noise_multiplier: float | None = None,
    ) -> bool:
        """Whether one more release with noise multiplier ``z`` would exceed the budget.

        ``z`` is the accounting noise multiplier,
        :func:`p2pfed.dp.effective_noise_multiplier` of the mechanism's sigma (the central
        one of a distributed release: the budget bounds the central epsilon).
        """
        return (
            self.epsilon_after(noise_multiplier, sampling_rate, steps, local_noise_multiplier)
            > self._budget
        )

    @property
    def exhausted(self) -> bool:
        """No further release with the most recently used noise multiplier fits the budget.

        False before the first release (no noise multiplier is known yet; ask
        :meth:`would_exceed` with the one you intend to use). A node whose ledger is
        exhausted stops contributing its data (spec/privacy.md).
        """
        if not self._recent:
            return False
        _, z, q, steps, local_z = self._recent[-1]
        return self.would_exceed(z, q, steps, local_z)

    # -- the one mutation -----------------------------------------------------------

    def record_release(
        self,
        *,
        round: int,
        noise_multiplier: float,
        sampling_rate: float = 1.0,
        steps: int = 1,
        local_noise_multiplier: float | None = None,
    ) -> float:
        """Record one release durably and return the new epsilon spent.

        Call it after computing the noisy update and before sending it; send only if it
        returns. ``noise_multiplier`` is the accounting ``z``
        (:func:`p2pfed.dp.effective_noise_multiplier` of sigma), ``round`` the round number
        (kept in the recent list for humans; repeated rounds are allowed, each call counts).

        For record-level DP-SGD, ``steps`` is the number of Poisson-subsampled steps the
        release took and ``sampling_rate`` their sampling probability (``z`` is then the
        step's noise multiplier, noise std over per-example clip norm).

        For a distributed release (Skellam shares, :mod:`p2pfed.skellam`) pass the
        Gaussian-equivalent central ``z`` as ``noise_multiplier`` and the local one as
        ``local_noise_multiplier``; both are charged at integer orders
        (:func:`p2pfed.accountant.integer_order_gaussian_rdp`), the budget applies to the
        central epsilon and :meth:`local_spent` reports the local one.

        Raises :class:`PrivacyBudgetExceeded` (nothing written) if epsilon would exceed the
        budget, :class:`LedgerError` if the file cannot be written (nothing recorded: the
        update must not be sent).
        """
        if not _is_count(round) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        groups, distributed = self._with(
            noise_multiplier, sampling_rate, steps, local_noise_multiplier
        )
        if max(len(groups), len(distributed)) > MAX_NOISE_MULTIPLIERS:
            raise LedgerError(
                f"privacy ledger {self._path} already holds {MAX_NOISE_MULTIPLIERS} distinct "
                "noise multipliers; use one of the noise multipliers already used "
                f"(e.g. {self._recent[-1][1]!r}) instead of a new value per round"
            )
        z = float(noise_multiplier)
        spent = _epsilon(groups, self._delta, distributed)
        if spent > self._budget:
            raise PrivacyBudgetExceeded(
                f"releasing an update with noise multiplier {z!r} would raise epsilon from "
                f"{self._spent:.6g} to {spent:.6g}, above the budget {self._budget:.6g} "
                f"(delta {self._delta:g}); this node must stop contributing its data"
            )
        local_z = None if local_noise_multiplier is None else float(local_noise_multiplier)
        row: _Row = (round, z, float(sampling_rate), int(steps), local_z)
        recent = [*self._recent, row][-RECENT_RELEASES:]
        releases = self._releases + 1
        self._write(groups, distributed, recent, releases)
        self._groups, self._distributed, self._recent = groups, distributed, recent
        self._spent = spent
        self._local_spent = _epsilon(groups, self._delta, distributed, local=True)
        self._releases = releases
        return spent

    def _write(
        self,
        groups: dict[Mechanism, int],
        distributed: dict[Distributed, int],
        recent: list[_Row],
        releases: int,
    ) -> None:
        data = encode_ledger_file(
            epsilon_budget=self._budget,
            delta=self._delta,
            groups=groups,
            recent=recent,
            epsilon_spent=_epsilon(groups, self._delta, distributed),
            releases=releases,
            distributed=distributed,
            local_epsilon_spent=_epsilon(groups, self._delta, distributed, local=True),
        )
        try:
            atomic_write_bytes(self._path, data, mode=0o600)
        except OSError as exc:
            raise LedgerError(
                f"cannot write privacy ledger {self._path} ({exc.strerror or exc}); the "
                "release was not recorded and the update must not be sent"
            ) from exc


def encode_ledger_file(
    *,
    epsilon_budget: float,
    delta: float,
    groups: Mapping[float, int] | Mapping[Mechanism, int],
    recent: Sequence[tuple[int, float]] | Sequence[Recent] | Sequence[_Row],
    epsilon_spent: float,
    releases: int | None = None,
    distributed: Mapping[Distributed, int] | None = None,
    local_epsilon_spent: float | None = None,
) -> bytes:
    """The exact bytes of a ledger file (spec/privacy.md, "Ledger file format").

    ``groups`` maps each noise multiplier ``z`` (or ``(z, sampling_rate)``) to its count of
    steps, ``recent`` lists the last ``(round, z)`` (or ``(round, z, sampling_rate,
    steps)``, or that plus the local ``z`` of a distributed release, else None) oldest
    first, ``releases`` the number of releases (default: the sum of the counts, as in
    version 1). ``distributed`` maps ``(central z, local z)`` of distributed releases to
    their counts. Version 1 is written unless some sampling rate is below 1 (version 2) or
    a distributed release is present (version 3, which also stores
    ``local_epsilon_spent``). Pure: no validation, no I/O.
    """
    mechanisms: dict[Mechanism, int] = {
        (key if isinstance(key, tuple) else (float(key), 1.0)): count
        for key, count in groups.items()
    }
    shares = dict(distributed or {})
    rows: list[_Row] = []
    for entry in recent:
        if len(entry) == 2:
            rows.append((entry[0], entry[1], 1.0, 1, None))
        elif len(entry) == 4:
            rows.append((entry[0], entry[1], entry[2], entry[3], None))
        else:
            rows.append(entry)
    version = _version_for(mechanisms, shares)
    by_noise: list[dict[str, Any]] = []
    for z, q in sorted(mechanisms):
        row: dict[str, Any] = {"noise_multiplier": z, "count": mechanisms[(z, q)]}
        if version >= 2:
            row["sampling_rate"] = q
        by_noise.append(row)
    recent_rows: list[dict[str, Any]] = []
    for r, z, q, n, local_z in rows:
        item: dict[str, Any] = {"round": r, "noise_multiplier": z}
        if version >= 2:
            item.update(sampling_rate=q, steps=n)
        if version >= 3:
            item["local_noise_multiplier"] = local_z
        recent_rows.append(item)
    body: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": version,
        "epsilon_budget": epsilon_budget,
        "delta": delta,
        "releases": sum(mechanisms.values()) + sum(shares.values())
        if releases is None
        else releases,
        "by_noise_multiplier": by_noise,
        "recent": recent_rows,
        # informational, and rounded so that the bytes do not depend on last-bit libm
        # differences between platforms
        "epsilon_spent": float(f"{epsilon_spent:.12g}"),
    }
    if version >= 3:
        body["skellam"] = [
            {"noise_multiplier": c, "local_noise_multiplier": lz, "count": shares[(c, lz)]}
            for c, lz in sorted(shares)
        ]
        local = epsilon_spent if local_epsilon_spent is None else local_epsilon_spent
        body["local_epsilon_spent"] = float(f"{local:.12g}")
    body_bytes = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
    digest = hashlib.sha256(body_bytes).hexdigest().encode("ascii")
    return _PREFIX + body_bytes + b',"sha256":"' + digest + b'"}\n'
