"""A node's differentially private releases: its ledger, its budget, the noise.

One job: turn a trained model into what may leave the node (spec/privacy.md). Node level:
clip the update and add Gaussian noise. Record level: DP-SGD's output is the release as
it is. Distributed: a Skellam share of the noise, added in the ring, whose integer words
the next group carries as they are (section 2B). Each release is recorded durably in the
privacy ledger, and the identity marked as having released, *before* it is returned, so
nothing leaves the node unaccounted; a ledger that cannot hold another release stops the
training (the node then contributes its model unchanged).

Example (what :class:`p2pfed.round_loop.RoundLoop` does each round)::

    privacy = PrivateRelease(federation, fixed_point, node_dir, threads=True)
    privacy.open_ledger(resumed=False)
    cost = privacy.cost()
    if cost is None or not privacy.exhausted(cost):
        released = await privacy.release(start, trained, round_, cost, noise_rng)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import trio

from p2pfed import dp, skellam
from p2pfed.config import FEDERATION_FILE_NAME
from p2pfed.errors import LedgerError
from p2pfed.federation import Federation
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.identity import IDENTITY_FILE_NAME, has_ledger_marker, mark_ledger_required
from p2pfed.ledger import PrivacyLedger, ledger_path

__all__ = ["PrivateRelease", "check_privacy_files"]

log = logging.getLogger("p2pfed.node")  # the node's log: operators filter on one name

_T = TypeVar("_T")


def check_privacy_files(
    node_dir: Path, federation: Federation, source: str, *, resumed: bool
) -> None:
    """Refuse to start a DP node whose budget cannot hold one release, or that has released
    before (a checkpoint, or the marker in its identity file) but lost its ledger: a fresh
    ledger would spend the budget again (spec/privacy.md, section 5)."""
    params = federation.params
    if not params.dp_enabled:
        return
    dp.check_budget(params, source)
    path = ledger_path(node_dir)
    if path.exists() or path.is_symlink():
        return
    marked = has_ledger_marker(node_dir / IDENTITY_FILE_NAME)
    if resumed or marked:
        why = "its identity key records a release" if marked else "it has a checkpoint"
        raise LedgerError(
            f"privacy ledger missing: {path} does not exist, but this node has spent privacy "
            f"budget before ({why}), and a new ledger would spend it again (restore it from "
            "backup, or create a new identity with p2pfed init in a new node directory)"
        )


class PrivateRelease:
    """This node's DP releases (see the module docstring). Without DP in the federation
    it has no ledger, and :meth:`cost` is None."""

    def __init__(
        self,
        federation: Federation,
        fixed_point: FixedPointParams,
        node_dir: Path,
        *,
        threads: bool,
    ) -> None:
        self.federation = federation
        self.fixed_point = fixed_point
        self.node_dir = Path(node_dir)
        self.threads = threads
        self.ledger: PrivacyLedger | None = None
        self.budget_exhausted = False
        """Whether the node has stopped training because its privacy budget is spent."""
        # distributed DP: (released model, its noisy ring words) until the first group
        self._distributed: tuple[np.ndarray, np.ndarray] | None = None

    def open_ledger(self, *, resumed: bool) -> None:
        """Open (or create) the ledger, after checking that the files allow it."""
        params = self.federation.params
        if not params.dp_enabled:
            return
        check_privacy_files(
            self.node_dir,
            self.federation,
            str(self.node_dir / FEDERATION_FILE_NAME),
            resumed=resumed,
        )
        path = ledger_path(self.node_dir)
        if path.exists():
            self.ledger = PrivacyLedger.open(path)
            return
        self.ledger = PrivacyLedger.create(
            path, epsilon_budget=params.dp_epsilon_budget, delta=params.dp_delta
        )

    def cost(self) -> dp.ReleaseCost | None:
        """What one release costs (None: DP is off)."""
        params = self.federation.params
        return dp.release_cost(params) if params.dp_enabled else None

    def exhausted(self, cost: dp.ReleaseCost) -> bool:
        """Whether the ledger cannot hold another release of ``cost`` (warned once: the node
        then keeps averaging, but never trains on its data again)."""
        ledger = self.ledger
        if ledger is None or not ledger.would_exceed(
            cost.noise_multiplier, cost.sampling_rate, cost.steps, cost.local_noise_multiplier
        ):
            return False
        if not self.budget_exhausted:
            log.warning(
                "privacy budget exhausted (epsilon %.4g of %.4g spent): this node has "
                "stopped training and contributes its model unchanged",
                ledger.spent(),
                ledger.epsilon_budget,
            )
        self.budget_exhausted = True
        return True

    async def release(
        self,
        start: np.ndarray,
        trained: np.ndarray,
        round_: int,
        cost: dp.ReleaseCost,
        noise_rng: np.random.Generator,
    ) -> np.ndarray:
        """The release of ``trained`` (trained from ``start``), recorded in the ledger."""
        params = self.federation.params
        words: np.ndarray | None = None
        if params.dp_level == "record":
            released = trained  # DP-SGD's output is the release: no further noise
        elif params.dp_level == "distributed":
            # a Skellam share of the noise, added in the ring: the words go to the group as
            # they are (spec/privacy.md 2B); `released` is what they decode to
            shares = skellam.DistributedDP(
                clip_norm=params.dp_clip_norm,
                noise_multiplier=params.dp_noise_multiplier,
                group_min=params.group_min,
                model_size=start.shape[0],
                fixed_point=self.fixed_point,
            )
            words, released = shares.encode_release(start, trained - start, noise_rng)
        else:
            sigma = params.dp_noise_multiplier
            noisy = dp.clip_and_noise(trained - start, params.dp_clip_norm, sigma, noise_rng)
            released = (start + noisy).astype(np.float32)
        ledger = self.ledger
        assert ledger is not None
        # durably record the release (and, once, that this identity has released) before
        # the model can leave this node
        if ledger.releases() == 0:
            await self._offload(self._mark_identity)
        await self._offload(
            lambda: ledger.record_release(
                round=round_,
                noise_multiplier=cost.noise_multiplier,
                sampling_rate=cost.sampling_rate,
                steps=cost.steps,
                local_noise_multiplier=cost.local_noise_multiplier,
            )
        )
        self._distributed = None if words is None else (released, words)
        return released

    def carried_words(self, model: np.ndarray, weight: int) -> np.ndarray | None:
        """The noisy ring words to contribute instead of encoding ``model``: those of a
        distributed-DP release, to the first group after it only, and only if ``model``
        is that release with its weight."""
        if self._distributed is None:
            return None
        released, words = self._distributed
        self._distributed = None
        if model is released and weight == int(words[-1]):
            log.debug("distributed DP: contributing the noisy ring words of this release")
            return words
        return None

    def _mark_identity(self) -> None:
        """Bind "this node has released" to its identity before the first release (a node
        built without a key file, in tests and simulations, has nothing to mark)."""
        key = self.node_dir / IDENTITY_FILE_NAME
        if key.exists():
            mark_ledger_required(key)

    async def _offload(self, function: Callable[[], _T]) -> _T:
        """File writes (fsync) in a worker thread, if the node uses them."""
        if self.threads:
            return await trio.to_thread.run_sync(function)
        return function()
