"""The round loop: a node's rounds, from training to the round's report.

One job: run this node's rounds (spec/group.md; spec/privacy.md; spec/server-optimizer.md).
Each round it

1. starts from the current model (the last average, or the initial model);
2. trains locally (with worker threads, off the event loop, so channels stay responsive);
3. with DP on, has :class:`~p2pfed.dp_release.PrivateRelease` clip and noise the update
   and record it in the ledger *before* anything leaves the node; out of budget, it
   contributes the start model unchanged;
4. offers the contribution through the :class:`~p2pfed.group_driver.GroupDriver` until a
   group completes (aborted groups are retried with the same contribution, at no extra
   privacy cost): the ``d`` steps of an exact round (:mod:`p2pfed.exact_rounds`), or
   ``random_steps`` push-sum groups;
5. applies the federation's server optimiser to the average, hands the round's checkpoint
   to the :class:`~p2pfed.checkpoint_writer.CheckpointWriter`, evaluates, and reports the
   round (logged, then ``on_round``).

Rules of this file: the loop never touches the network. It reaches peers only through the
group driver (groups, positions, pace) and :class:`LoopLinks` (who is connected, and the
peers' latest aggregated model, which the node fetches). It owns the model state the node
exposes (``round``, ``model``, ``weight``, ``local_rounds``, the latest contribution and
the metrics); nothing else assigns it during a run. Every rule of a round lives here
once: the contribution weight, the server step, the evaluation words; simnet and the node
read the results, never recompute them.

Example (what :class:`p2pfed.node.Node` does)::

    loop = RoundLoop(federation=..., task=task, options=options, driver=driver,
                     privacy=privacy, checkpoints=writer, links=links, ...)
    loop.begin(model, fingerprint, data.num_train)  # or resume from the checkpoint
    await loop.run(torch_model, data)  # until stopped or max_rounds
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import trio

from p2pfed import dp, dp_sgd
from p2pfed.checkpoint import Checkpoint, load_checkpoint
from p2pfed.checkpoint_writer import (
    CHECKPOINT_FILE_NAME,
    SERVER_OPTIMIZER_FILE_NAME,
    CheckpointWriter,
)
from p2pfed.dp_release import PrivateRelease
from p2pfed.errors import P2pfedError, TaskError, raised_in
from p2pfed.exact_rounds import Position, RoundPlan, member_indices, random_steps_for
from p2pfed.federation import Federation
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import GroupCompleted, GroupConfig, GroupProtocol, Phase, SitOut
from p2pfed.group_driver import GroupDriver
from p2pfed.identity import NodeId
from p2pfed.messages import ModelState
from p2pfed.model_vector import model_to_vector, vector_to_model
from p2pfed.round_rules import ring_cap, training_weight
from p2pfed.server_optimizer import (
    ServerOptimizer,
    ServerOptimizerSettings,
    ServerOptimizerStateError,
)
from p2pfed.task import (
    NodeData,
    RoundContext,
    Task,
    TrainResult,
    call_train,
    round_config,
)

if TYPE_CHECKING:  # the node's options: the node imports this module, not the reverse
    from p2pfed.node import NodeOptions

__all__ = ["EVALUATION_WORDS", "LoopLinks", "RoundLoop", "RoundReport"]

log = logging.getLogger("p2pfed.node")  # the node's log: operators filter on one name

_T = TypeVar("_T")

EVALUATION_WORDS = 3
"""Words a contribution appends to the model with federation metrics on (spec/group.md,
"Federation metrics"): correct count, loss sum and sample count, each over its weight."""


class _CaughtUp:
    """A round given up because the node was behind and adopted its peers' average."""


_CAUGHT_UP = _CaughtUp()


@dataclass(frozen=True)
class RoundReport:
    """What one completed round produced (logged, and passed to ``on_round``)."""

    round: int
    group_size: int
    seconds: float
    """The whole round: training, DP, then finding a group and the all-reduce."""
    train_seconds: float
    formation_seconds: float
    """From offering the contribution to the start of the group that completed."""
    allreduce_seconds: float
    """From that group's start to the result (masking, shards, decoding)."""
    metrics: dict[str, float]
    epsilon_spent: float | None
    steps: int = 1
    """Groups this round took (exact averaging: the plan's steps)."""
    coverage: int = 0
    """Exact averaging: how many nodes' models the round's average can include (the
    product of the sizes of this node's groups); equal to ``nodes`` when it is exact."""
    nodes: int = 0
    """Exact averaging: the number of nodes of the round (0 for random groups)."""
    train_loss: float | None = None
    federation: dict[str, float] | None = None
    """The federation's figures this round computed (:attr:`RoundLoop.federation_metrics`), or
    None if it computed none."""


def _no_peers() -> list[NodeId]:
    return []


async def _no_aggregate(after: int, timeout: float) -> ModelState | None:
    return None


@dataclass
class LoopLinks:
    """What the round loop needs of the node's peers beyond the group driver (the node's
    channel pool answers; a test passes functions of its own)."""

    connected: Callable[[], list[NodeId]] = _no_peers
    """Peers with an open channel (a fresh federation's first exact round waits for
    them to settle)."""
    known_peers: Callable[[], int] = lambda: 0
    """How many peers this node knows of (random rounds' automatic step count)."""
    fetch_aggregate: Callable[[int, float], Awaitable[ModelState | None]] = _no_aggregate
    """Ask the connected peers for their latest aggregated model and return the one of
    the latest round after the given one that arrives within the timeout (seconds);
    None if no peer served one."""


class RoundLoop:
    """This node's rounds (see the module docstring).

    The model state it owns: :attr:`round`, :attr:`model` with its push-sum / block
    :attr:`weight`, :attr:`local_rounds`, :attr:`contribution` and
    :attr:`contribution_weight` (what the latest group offer averaged), :attr:`aggregated`
    (what the node serves to peers that sync), :attr:`last_metrics` and
    :attr:`federation_metrics`.
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        federation: Federation,
        task: Task | None,
        options: NodeOptions,
        group_config: GroupConfig,
        fixed_point: FixedPointParams,
        exact: bool,
        driver: GroupDriver,
        privacy: PrivateRelease,
        checkpoints: CheckpointWriter,
        links: LoopLinks,
        stop: trio.Event,
        rng: random.Random,
        randbytes: Callable[[int], bytes] = os.urandom,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.federation = federation
        self.task = task
        self.options = options  # the node's (shared: its task settings are filled in later)
        self.group_config = group_config
        self.fixed_point = fixed_point
        self.exact = exact
        self.driver = driver
        self.privacy = privacy
        self.checkpoints = checkpoints
        self.links = links
        self._stop = stop
        self._rng = rng
        self._randbytes = randbytes
        self._on_round = on_round
        self.fingerprint = b""  # of the task's model (set by begin)
        self.round = 0
        self.local_rounds = 0  # how many times this node trained (its own, even after a sync)
        self.model: np.ndarray | None = None
        self.weight = 1  # push-sum / block weight of the model held (spec/group.md, "Weights")
        self.training_weight = 1  # this node's FedAvg weight n_k when it has trained
        self.contribution_weight = 1  # the integer weight of the latest contribution offered
        self.contribution: np.ndarray | None = None  # the model of the latest contribution
        self.aggregated: tuple[int, np.ndarray] | None = None
        """The latest aggregated model and its round: the only model served to peers (never
        a freshly trained one, so joining late reveals nothing of one node's data)."""
        self.last_metrics: dict[str, float] = {}
        self.federation_metrics: dict[str, float] | None = None
        """The latest federation-wide evaluation (spec/group.md, "Federation metrics"):
        "accuracy" and "loss" over every sample the members' evaluations saw, "round" (the
        round whose model they evaluated) and, when the round was exact, "samples"; None
        until a round has carried evaluation sums (or always, with the feature off)."""
        self._evaluated: tuple[int, dict[str, float], int] | None = None  # round, metrics, n
        self._words_scaled = False  # warned that the evaluation words were scaled down
        self.server_optimizer: ServerOptimizer | None = None
        self._announced_finish = False

    @property
    def _group(self) -> GroupProtocol:
        group = self.driver.group
        assert group is not None, "the driver's protocol is made before the rounds start"
        return group

    def begin(self, model: np.ndarray, fingerprint: bytes, num_train: int) -> None:
        """Start from the task's initial ``model`` with ``num_train`` training records, or
        resume from the node directory's checkpoint; open the ledger and the server
        optimiser of that round."""
        node_dir = self.checkpoints.node_dir
        self.fingerprint = fingerprint
        self.model = model
        self.training_weight = self._training_weight(num_train)
        self.weight = self.training_weight
        checkpoint = load_checkpoint(
            node_dir / CHECKPOINT_FILE_NAME, expected_fingerprint=self.fingerprint
        )
        if checkpoint is not None:
            self.round = checkpoint.round
            self.model = checkpoint.model.copy()
            self.weight = self._ring_cap(round(checkpoint.weight))
            self.local_rounds = int(checkpoint.extra.get("local_rounds", checkpoint.round))
            self.aggregated = (self.round, self.model.copy()) if self.round else None
            log.info("resumed from checkpoint at round %d", self.round)
        self.privacy.open_ledger(resumed=checkpoint is not None)
        self.server_optimizer = self._open_server_optimizer()

    async def run(self, torch_model: torch.nn.Module, data: NodeData | None) -> None:
        """Run rounds until stopped (or ``max_rounds``, unless lingering), then evaluate
        the model held at the end."""
        await self._rounds(torch_model, data)
        if data is not None and self.options.evaluate_every:
            # the model may have moved since the last evaluation (lingering)
            self.last_metrics = await self.offload(self._evaluate, torch_model, data)

    async def offload(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking work (training, evaluation, fsync) off the event loop if allowed.

        An exception raised in the task's own code becomes a :class:`TaskError`, so that
        the operator is told it is the task that failed (the cause keeps the traceback).
        """
        try:
            if self.options.threads:
                return await trio.to_thread.run_sync(function, *args)
            return function(*args)
        except Exception as exc:
            if isinstance(exc, P2pfedError) or not raised_in(exc, self._task_files()):
                raise
            text = " ".join(str(exc).split()) or "no message"
            raise TaskError(
                f"the task {type(self.task).__name__} failed: {type(exc).__name__}: {text}"
            ) from exc

    def _task_files(self) -> list[str]:
        """The source files of the task's class and its bases, but for p2pfed's own
        plumbing (its tasks package counts as a task)."""
        package = os.path.dirname(os.path.abspath(__file__))
        tasks = os.path.join(package, "tasks")
        files = []
        for cls in type(self.task).__mro__:
            module = sys.modules.get(cls.__module__)
            path = getattr(module, "__file__", None)
            if path is None:
                continue
            path = os.path.abspath(path)
            if not path.startswith(package + os.sep) or path.startswith(tasks + os.sep):
                files.append(path)
        return files

    def _open_server_optimizer(self) -> ServerOptimizer | None:
        """The federation's server optimiser with this node's saved state
        (spec/server-optimizer.md, section 6); None for plain FedAvg."""
        assert self.model is not None
        settings = ServerOptimizerSettings.from_params(self.federation.params)
        if settings.name == "fedavg":
            return None
        path = self.checkpoints.node_dir / SERVER_OPTIMIZER_FILE_NAME
        optimizer: ServerOptimizer | None = None
        try:
            optimizer = ServerOptimizer.load(path, len(self.model), settings)
        except ServerOptimizerStateError as exc:
            log.warning("not using the server optimiser state: %s", exc)
        if optimizer is not None and optimizer.name == settings.name:
            if optimizer.round == self.round:
                return optimizer
            log.warning(
                "the server optimiser state is of round %d, the checkpoint of round %d: "
                "starting it again from zero (this node's model will differ from its "
                "peers' for a while)",
                optimizer.round,
                self.round,
            )
        return ServerOptimizer(settings, len(self.model), round=self.round)

    def _training_weight(self, weight: int) -> int:
        """The FedAvg weight of this node's trained model (:func:`training_weight`)."""
        # capped by the method: the conformance tests replace it to lift the cap
        return training_weight(self.federation, weight, self._ring_cap)

    def _ring_cap(self, weight: int) -> int:
        """``weight`` as a contribution may carry it: an integer in ``[0, max_weight]``."""
        return ring_cap(self.fixed_point, weight)

    # -- rounds --------------------------------------------------------------------------

    async def _rounds(self, torch_model: torch.nn.Module, data: NodeData | None) -> None:
        assert self.model is not None
        if self.round == 0 and self.options.grid is None:
            # a grid node starts from its own model: adopting a peer's aggregate would
            # count it twice in the grid's exact mean and put this node out of step
            await self._sync_model()
        if self.exact and self.round == 0:
            await self._settle()
        generator = torch.Generator().manual_seed(self._rng.getrandbits(63))
        noise_rng = dp.noise_generator(self._randbytes)
        while not self._stop.is_set():
            finished = self.options.max_rounds is not None and self.round >= self.options.max_rounds
            if finished and not self.options.linger:
                break
            if finished and not self._announced_finish:
                self._announced_finish = True
                log.info("finished %d rounds; averaging without training until stopped", self.round)
            started = trio.current_time()
            start = self.model
            result: TrainResult | None = None
            train_seconds = 0.0
            if finished:
                released = start
            else:
                if not self.exact and data is not None and self.options.training:
                    # pacing keeps training in step; pure averaging has nothing to pace
                    await self._keep_pace()
                    start = self.model
                released, result, train_seconds = await self._contribution(
                    torch_model, data, start, generator, noise_rng
                )
            weight = self._round_weight(result, finished=finished)
            # lingering only helps peers short of rounds: they invite, we answer (a grid
            # line, and an exact round's class, needs its initiator, whatever its round)
            initiate = (
                not (finished and self.options.linger_passive and self.options.grid is None)
                or self.exact
            )
            self.driver.offered_at = trio.current_time()
            done = await self._average(released, weight, initiate=initiate)
            if done is None:
                break
            if isinstance(done, _CaughtUp):
                continue  # train again, from the adopted average
            outcome, steps, coverage, nodes = done
            completed_at = trio.current_time()
            group_started = self.driver.started_at.get(outcome.group_id, completed_at)
            self.model = self._server_step(start, self.model)
            # one completed round of this node: taking a peer's higher round instead would
            # skip local training steps (rounds racing ahead)
            self.round += 1
            if result is not None:
                self.local_rounds += 1
            self.aggregated = (self.round, self.model)
            self._save_checkpoint()
            metrics: dict[str, float] = {}
            every = self.options.evaluate_every
            if data is not None and every and self.round % every == 0:
                metrics = await self.offload(self._evaluate, torch_model, data)
                self.last_metrics = metrics
                self._evaluated = (self.round, metrics, data.num_test)
            train_loss = result.loss if result is not None else None
            figure = self.federation_metrics
            fresh = figure is not None and figure["round"] == self.round - 1
            report = RoundReport(
                round=self.round,
                group_size=len(outcome.members),
                seconds=trio.current_time() - started,
                train_seconds=train_seconds,
                formation_seconds=group_started - self.driver.offered_at,
                allreduce_seconds=completed_at - group_started,
                metrics=metrics,
                epsilon_spent=self.privacy.ledger.spent() if self.privacy.ledger else None,
                steps=steps,
                coverage=coverage,
                nodes=nodes,
                train_loss=train_loss,
                federation=dict(figure) if figure is not None and fresh else None,
            )
            self._log_round(report)
            if self._on_round is not None:
                self._on_round(report)

    def _round_weight(self, result: TrainResult | None, *, finished: bool) -> int:
        """This round's contribution weight (spec/group.md, "Weights"): the training weight
        after training; a node that does not train contributes the weight of the model it
        holds (pure averaging conserves the weighted sum), except in an exact round, where
        a node that skipped its training (finished, or out of privacy budget) adds nothing
        (weight 0), as FedAvg averages only the clients that trained."""
        if result is not None:
            declared = result.weight
            self.training_weight = self._training_weight(
                self.training_weight if declared is None else declared
            )
            return self.training_weight
        if self.exact and self.options.training:
            return 0  # it would have trained (finished, out of budget, no data): no new update
        return self.weight

    async def _average(
        self, released: np.ndarray, weight: int, *, initiate: bool
    ) -> tuple[GroupCompleted, int, int, int] | _CaughtUp | None:
        """Average ``released`` with peers: one group, or the steps of an exact round.

        Sets ``self.model`` and ``self.weight`` to the result and returns the last group,
        the number of steps, the coverage and the number of nodes (None: stopping;
        ``_CAUGHT_UP``: the node adopted a peer's average instead). With federation
        metrics on, the averaged vector is ``released`` followed by this node's evaluation
        words; their average becomes :attr:`federation_metrics`.
        """
        released = self._with_evaluation_words(released, weight)
        if not self.exact:
            return await self._random_steps(released, weight, initiate=initiate)
        position = Position(self.round, 0, (), self.driver.class_count())
        model, coverage, steps = released, 1, 0
        carried: np.ndarray | None = None
        sums_carried = True  # every step after the first sent the previous integer sum on
        while True:
            if steps and carried is None:
                sums_carried = False
            outcome = await self._one_group(
                model, weight, initiate=initiate, position=position, carried=carried
            )
            if outcome is None and self.driver.behind and not self._stop.is_set():
                await self._catch_up()
                return _CAUGHT_UP
            if outcome is None:
                return None
            if isinstance(outcome, SitOut):
                await self._sit_out(outcome)
                return _CAUGHT_UP
            steps += 1
            coverage *= len(outcome.members)
            model, carried = outcome.mean, None
            if not outcome.total_weight:
                pass  # nobody had weight: every member keeps its own model and weight 0
            elif outcome.structured:
                # the block weight: the group's total, the weight of all the models it
                # averaged (a share would no longer weigh the blocks of the next step right)
                weight = self._ring_cap(outcome.total_weight)
                if weight == outcome.total_weight:
                    # send the group's integer sum on as it is: the round's last sum is
                    # then the one a single group of all nodes would have, bit for bit
                    # (re-encoding the float32 mean would round twice more)
                    carried = outcome.ring_sum
            else:
                weight = outcome.share(self.node_id)  # a fallback group: push-sum
            # the position the group formed at (its count may have moved while waiting)
            current = self.driver.position
            assert current is not None
            plan = self._group.exact_plan(current.size)
            if steps >= len(plan.sizes):
                break
            index = member_indices(outcome.group_id, [m.raw for m in outcome.members])
            position = current.next(index[self.node_id.raw])
        # the last group's integer sum is every node's step-0 words summed only if it
        # covered the round and no step in between re-encoded a float32 mean
        whole = coverage == plan.nodes and sums_carried and outcome.structured
        self.model = self._adopt(model, outcome.ring_sum if whole else None)
        self.weight = weight
        self._log_coverage(plan, coverage)
        return outcome, steps, coverage, plan.nodes

    async def _keep_pace(self) -> None:
        """Random rounds: before training round ``r``, wait while a connected peer has
        announced round ``r - 1``, for at most ``pace_timeout`` seconds, answering the
        groups such peers invite it to with the current model (pure averaging conserves the
        weighted sum; spec/group.md, "Random rounds", pace).

        Without it nodes drift apart by their speed (a node with 50 records trains ten
        times as fast as one with 500): a fast node's round ``r`` then averages mostly
        models of much earlier rounds, and each node's accuracy per round trails FedAvg's.
        It waits passively (answering invites, never initiating) so that waiting nodes do
        not spend the slow node's CPU and bandwidth averaging among themselves.
        """
        self.driver.announce_round(self.round)
        timeout = self.options.pace_timeout
        if timeout <= 0 or not self.driver.laggards():
            return
        waited, mixed = trio.current_time(), 0
        with trio.move_on_after(timeout) as scope:
            while self.driver.laggards() and not self._stop.is_set():
                outcome = await self._answer_laggards()
                if outcome is None:
                    break
                mixed += 1
                self.model = self._adopt(outcome.mean, None)
                if outcome.total_weight:
                    self.weight = outcome.share(self.node_id)
        if scope.cancelled_caught:
            self.driver.withdraw()
            for peer in self.driver.laggards():
                # stuck (e.g. short of a group on its side): not waited for again until it
                # moves on, or every round would wait the whole timeout for it
                self.driver.pace_gave_up[peer] = self.round - 1
            log.info(
                "pace: %d peer(s) still at round %d after %.1f s; training anyway",
                len(self.driver.laggards()),
                self.round - 1,
                trio.current_time() - waited,
            )
        elif mixed:
            log.debug(
                "pace: waited %.2f s (%d groups) for peers to reach round %d",
                trio.current_time() - waited,
                mixed,
                self.round,
            )

    async def _answer_laggards(self) -> GroupCompleted | None:
        """Offer the current model passively until a group completes (returned) or no
        connected peer is behind any more while no group is forming (None)."""
        assert self.model is not None
        group = self._group
        outcome: GroupCompleted | SitOut | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    self.driver.pace_changed = trio.Event()
                    idle = group.phase is Phase.READY
                    if idle and (not self.driver.laggards() or self._stop.is_set()):
                        self.driver.withdraw()
                        nursery.cancel_scope.cancel()
                        return
                    with trio.move_on_after(0.25):  # the phase moves without an event
                        await self.driver.pace_changed.wait()

            nursery.start_soon(watch)
            offered = self._with_evaluation_words(self.model, self.weight)
            outcome = await self._one_group(offered, self.weight, initiate=False)
            nursery.cancel_scope.cancel()
        return outcome if isinstance(outcome, GroupCompleted) else None

    def random_steps(self) -> int:
        """How many random groups this node joins per round (spec/group.md, "Random
        rounds"): the federation's ``random_steps``, or with 0 enough for the federation
        as this node sees it (``min_nodes``, or itself and every peer it knows of)."""
        configured = self.federation.params.random_steps
        if configured:
            return configured
        seen = max(self.federation.params.min_nodes, 1 + self.links.known_peers())
        config = self.group_config
        return random_steps_for(seen, group_max=config.group_max, group_min=config.group_min)

    async def _random_steps(
        self, released: np.ndarray, weight: int, *, initiate: bool
    ) -> tuple[GroupCompleted, int, int, int] | None:
        """Random averaging: push-sum over ``random_steps()`` random groups. Each group
        leaves its members the group's weighted mean and an integer share of its weight,
        so the next group weighs them right and the weighted sum is conserved."""
        model, steps, wanted = released, 0, self.random_steps()
        outcome: GroupCompleted | None = None
        while steps < wanted:
            completed = await self._one_group(model, weight, initiate=initiate)
            if completed is None or isinstance(completed, SitOut):
                if outcome is None:
                    return None
                break  # stopping: keep what the finished steps averaged
            outcome, steps = completed, steps + 1
            model = outcome.mean
            weight = outcome.share(self.node_id) if outcome.total_weight else weight
        assert outcome is not None
        self.model, self.weight = self._adopt(model, None), weight
        return outcome, steps, 0, 0

    def vector_size(self) -> int:
        """The length of the averaged vector: the model, and the evaluation words if on."""
        size = len(self.model) if self.model is not None else 0
        return size + (EVALUATION_WORDS if self.federation.params.federation_metrics_active else 0)

    def _with_evaluation_words(self, released: np.ndarray, weight: int) -> np.ndarray:
        """``released`` followed by this node's evaluation words, if the federation shares
        them (spec/group.md, "Federation metrics"): ``correct / w``, ``loss_sum / w`` and
        ``n / w`` for the ``n`` test samples of its evaluation of the model it holds, ``w``
        its contribution weight, so that the group's weighted mean of each word is the
        members' sum over their total weight. Zeros with weight 0, or without an
        evaluation of this round's start model (``evaluate_every``, a model just adopted
        from a peer): the figures then describe one model, of one round."""
        if not self.federation.params.federation_metrics_active:
            return released
        words = np.zeros(EVALUATION_WORDS, np.float64)
        evaluated = self._evaluated
        if weight > 0 and evaluated is not None and evaluated[0] == self.round:
            _, metrics, count = evaluated
            accuracy, loss = metrics.get("accuracy"), metrics.get("loss")
            if (
                count > 0
                and accuracy is not None
                and loss is not None
                and math.isfinite(accuracy)
                and math.isfinite(loss)
            ):
                ratio = count / weight
                words[:] = (accuracy * ratio, loss * ratio, ratio)
        peak = float(np.abs(words).max())
        # a word beyond the clip would be clipped alone and skew its ratio: scale all three
        # (this node's evaluation then counts as fewer samples, its figures unchanged)
        limit = self.fixed_point.clip * (1 - 2**-20)  # float32 rounding stays inside
        if peak > limit:
            words *= limit / peak
            if not self._words_scaled:
                self._words_scaled = True
                log.warning(
                    "the evaluation words (test samples per unit of weight %.4g, loss %.4g) "
                    "exceed the federation's clip %g: this node's evaluation counts as %.3g "
                    "of its samples in the federation's figures",
                    words[2] * peak / limit,
                    words[1] / words[2] if words[2] else math.nan,
                    self.fixed_point.clip,
                    limit / peak,
                )
        return np.concatenate([released.astype(np.float32, copy=False), words.astype(np.float32)])

    def _adopt(self, vector: np.ndarray, ring_sum: np.ndarray | None) -> np.ndarray:
        """The model part of an averaged vector; its evaluation words, if any, set
        :attr:`federation_metrics`. ``ring_sum``: the round's whole integer sum (an exact
        round with every step's sum carried), from which the figures are exact and the
        number of samples follows; else they come from the float32 mean."""
        if not self.federation.params.federation_metrics_active:
            return vector
        model, words = vector[:-EVALUATION_WORDS], vector[-EVALUATION_WORDS:]
        figure: dict[str, float] | None = None
        if ring_sum is not None and len(ring_sum) == len(vector) + 1:
            signed = ring_sum[-EVALUATION_WORDS - 1 : -1].view(self.fixed_point.signed_dtype)
            correct, loss_sum, count = (int(v) for v in signed)
            if count > 0:
                figure = {
                    "accuracy": correct / count,
                    "loss": loss_sum / count,
                    "samples": float(round(count / self.fixed_point.scale)),
                }
        else:
            correct_mean, loss_mean, count_mean = (float(v) for v in words)
            if count_mean > 0:
                figure = {"accuracy": correct_mean / count_mean, "loss": loss_mean / count_mean}
        if figure is not None:
            figure["round"] = float(self.round)
            self.federation_metrics = figure
        return model

    def _log_coverage(self, plan: RoundPlan, coverage: int) -> None:
        if plan.sizes and coverage == plan.participants < plan.nodes:
            log.info(
                "round %d was exact over %d of %d nodes (%d sat it out: %d nodes have no "
                "plan of groups of %d to %d)",
                self.round + 1,
                coverage,
                plan.nodes,
                plan.sitting_out,
                plan.nodes,
                self.group_config.group_min,
                self.group_config.group_max,
            )
        elif coverage != plan.nodes:
            log.warning(
                "round %d was not exact: its average covers at most %d of %d nodes (%s)",
                self.round + 1,
                coverage,
                plan.nodes,
                "a class was incomplete" if plan.sizes else "no exact plan for this many nodes",
                extra={"event": "inexact_round", "coverage": coverage, "nodes": plan.nodes},
            )

    async def _catch_up(self) -> None:
        """Adopt a peer's later average: this node was left behind (see
        :meth:`GroupDriver.refresh_position`)."""
        self.driver.behind = False
        self.driver.withdraw()
        self.driver.position = None
        behind = self.round
        await self._sync_model()
        log.warning(
            "this node was at round %d while its peers were further: adopted their "
            "average of round %d (its training of round %d is not used)",
            behind,
            self.round,
            behind,
            extra={"event": "caught_up", "from_round": behind, "to_round": self.round},
        )

    async def _one_group(
        self,
        model: np.ndarray,
        weight: int,
        *,
        initiate: bool,
        position: Position | None = None,
        carried: np.ndarray | None = None,
    ) -> GroupCompleted | SitOut | None:
        if carried is None:
            # the first group after a distributed-DP release gets its noisy ring words
            carried = self.privacy.carried_words(model, weight)
        self.contribution_weight = weight
        self.contribution = model
        return await self.driver.offer(
            model, weight, self.round, initiate=initiate, position=position, carried=carried
        )

    def _log_round(self, report: RoundReport) -> None:
        metrics = report.metrics
        figure = report.federation
        log.info(
            "round %d done: %s, %.2fs (training %.2fs%s)%s%s",
            report.round,
            f"{report.steps} steps, exact over {report.nodes} nodes"
            if report.nodes and report.coverage == report.nodes
            else f"{report.steps} steps, covering {report.coverage} of {report.nodes} nodes"
            if report.nodes
            else f"{report.steps} random groups, the last of {report.group_size}"
            if report.steps > 1
            else f"group of {report.group_size}",
            report.seconds,
            report.train_seconds,
            f", loss {report.train_loss:.4f}" if report.train_loss is not None else "",
            "".join(f", {k} {v:.4f}" for k, v in sorted(metrics.items())),
            _federation_text(figure),
            extra={
                "event": "round",
                "round": report.round,
                "group_size": report.group_size,
                "steps": report.steps,
                "coverage": report.coverage,
                "nodes": report.nodes,
                "seconds": round(report.seconds, 4),
                "train_seconds": round(report.train_seconds, 4),
                "formation_seconds": round(report.formation_seconds, 4),
                "allreduce_seconds": round(report.allreduce_seconds, 4),
                **(
                    {"train_loss": round(report.train_loss, 6)}
                    if report.train_loss is not None and math.isfinite(report.train_loss)
                    else {}
                ),
                **(
                    {"epsilon_spent": round(report.epsilon_spent, 6)}
                    if report.epsilon_spent is not None
                    else {}
                ),
                # distributed DP's second, weaker guarantee (against mask-stripping members)
                **(
                    {"local_epsilon_spent": round(self.privacy.ledger.local_spent(), 6)}
                    if self.privacy.ledger is not None
                    and self.federation.params.dp_level == "distributed"
                    else {}
                ),
                **{k: round(v, 6) for k, v in metrics.items()},
                **(
                    {f"federation_{k}": round(v, 6) for k, v in figure.items()}
                    if figure is not None
                    else {}
                ),
            },
        )

    def _server_step(self, start: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The federation's server optimiser on this round's average (fedavg: adopt it)."""
        if self.server_optimizer is None:
            return average
        return self.server_optimizer.step(start, average, round=self.round + 1)

    # -- exact rounds: positions ---------------------------------------------------------

    async def _sit_out(self, sit_out: SitOut) -> None:
        """Sit round ``sit_out.round`` out: withdraw, wait for the participants' average of
        that round, and adopt it (spec/group.md, "Exact rounds", sitting out)."""
        self.driver.withdraw()
        self.driver.position = None
        behind = self.round
        deadline = trio.current_time() + 2 * self.group_config.class_timeout
        while self.round <= behind and trio.current_time() < deadline:
            if self._stop.is_set():
                return
            await self._sync_model(timeout=max(self.options.sync_timeout, 1.0))
            if self.round <= behind:
                await trio.sleep(0.05)
        log.info(
            "sat round %d out (%d of %d nodes take part in a round); %s",
            behind + 1,
            sit_out.participants,
            sit_out.nodes,
            f"adopted its average (round {self.round})"
            if self.round > behind
            else "no peer served its average in time",
            extra={"event": "sat_out", "round": behind + 1},
        )

    async def _contribution(
        self,
        torch_model: torch.nn.Module,
        data: NodeData | None,
        start: np.ndarray,
        generator: torch.Generator,
        noise_rng: np.random.Generator,
    ) -> tuple[np.ndarray, TrainResult | None, float]:
        """The model this node releases this round, what training reported (None: it did
        not train) and the seconds spent training."""
        params = self.federation.params
        if data is None or self.task is None or not self.options.training:
            return start, None, 0.0
        cost = self.privacy.cost()
        if cost is not None and self.privacy.exhausted(cost):
            # out of privacy budget: keep averaging, but never train on the data again
            return start, None, 0.0
        began = trio.current_time()
        context = RoundContext(
            round=self.round,
            local_round=self.local_rounds,
            node_seed=self._rng.getrandbits(63),
        )
        record_level = cost is not None and params.dp_level == "record"
        dp_rng = noise_rng if record_level else None
        trained, result = await self.offload(
            self._train, torch_model, data, start, generator, context, dp_rng
        )
        train_seconds = trio.current_time() - began
        if cost is None:
            return trained, result, train_seconds
        released = await self.privacy.release(start, trained, self.round, cost, noise_rng)
        return released, result, train_seconds

    def _train(
        self,
        torch_model: torch.nn.Module,
        data: NodeData,
        start: np.ndarray,
        generator: torch.Generator,
        context: RoundContext,
        dp_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, TrainResult]:
        """Local training from ``start``: the task's ``train``, or with ``dp_rng`` (record-level
        DP) the federation's DP-SGD steps on the task's data, loss and learning rate."""
        assert self.task is not None
        vector_to_model(torch_model, start)
        config = round_config(self.task, context.round, self.options.task_config)
        if dp_rng is None:
            result = call_train(self.task, torch_model, data, config, generator, context)
            return model_to_vector(torch_model), result
        params = self.federation.params
        _, targets = dp_sgd.training_tensors(data.train)
        report = dp_sgd.dp_sgd(
            torch_model,
            data.train,
            steps=params.dp_steps,
            sampling_rate=params.dp_sample_rate,
            clip_norm=params.dp_clip_norm,
            noise_multiplier=params.dp_noise_multiplier,
            lr=float(config.get("lr", 0.1)),
            rng=dp_rng,
            loss=dp_sgd.task_loss(self.task, targets),
        )
        # the weight stays data-independent (1, spec/privacy.md 2.3): no count is declared
        return model_to_vector(torch_model), TrainResult(samples=report.samples, loss=report.loss)

    def _evaluate(self, torch_model: torch.nn.Module, data: NodeData) -> dict[str, float]:
        assert self.task is not None and self.model is not None
        vector_to_model(torch_model, self.model)
        return {
            k: float(v)
            for k, v in self.task.evaluate(torch_model, data, self.options.task_config).items()
        }

    def _checkpoint_snapshot(self) -> tuple[Checkpoint, bytes | None]:
        """The checkpoint of the round just completed, and the server optimiser's state
        file of that same moment (copies: the round loop goes on while they are written)."""
        assert self.model is not None
        checkpoint = Checkpoint(
            round=self.round,
            model=self.model.copy(),
            weight=self.weight,
            fingerprint=self.fingerprint,
            trained=self.options.training,
            extra={"local_rounds": self.local_rounds},
        )
        state = self.server_optimizer.encode() if self.server_optimizer is not None else None
        return checkpoint, state

    def _save_checkpoint(self) -> None:
        """Checkpoint the round just completed (written beside the next round, with
        worker threads: :class:`~p2pfed.checkpoint_writer.CheckpointWriter`)."""
        self.checkpoints.save(*self._checkpoint_snapshot())

    async def _settle(self, quiet: float = 1.0) -> None:
        """Exact rounds, before a fresh federation's first round: wait until this node sees
        the federation's ``min_nodes`` (logging what it waits for every 10 s), then until
        its set of peers has stopped changing for ``quiet`` seconds (at most
        ``sync_timeout``), so that the first round is not run by the first few nodes up
        while the others are still connecting (they would only catch up by adopting its
        average)."""
        wanted = self.federation.params.min_nodes
        waiting_since = trio.current_time()
        next_log = waiting_since + 10.0
        while 1 + len(self.links.connected()) < wanted and not self._stop.is_set():
            now = trio.current_time()
            if now >= next_log:
                log.info(
                    "waiting for the first round: %d of the federation's min_nodes = %d "
                    "nodes connected (%.0f s)",
                    1 + len(self.links.connected()),
                    wanted,
                    now - waiting_since,
                )
                next_log = now + 10.0
            await trio.sleep(0.05)
        deadline = trio.current_time() + self.options.sync_timeout
        last = set(self.links.connected())
        changed_at = trio.current_time()
        while trio.current_time() < deadline and not self._stop.is_set():
            await trio.sleep(0.05)
            now, peers = trio.current_time(), set(self.links.connected())
            if peers != last:
                last, changed_at = peers, now
            elif now - changed_at >= quiet:
                return

    async def _sync_model(self, timeout: float | None = None) -> None:
        """A fresh node adopts the latest aggregated model of its peers, if any has one.

        Only aggregated models are ever served (never a peer's freshly trained one), so
        joining late reveals nothing about any single node's data.
        """
        assert self.model is not None
        wait = self.options.sync_timeout if timeout is None else timeout
        best = await self.links.fetch_aggregate(self.round, wait)
        if best is not None:
            self.model = np.frombuffer(best.parameters, dtype="<f4").astype(np.float32)
            self.round = best.round
            if self.server_optimizer is not None:
                # the peer's optimiser state is not transferred: start it from zero
                self.server_optimizer.reset(self.round)
            log.info("adopted the aggregated model of round %d from a peer", best.round)


def _federation_text(figure: dict[str, float] | None) -> str:
    """The per-round log line's federation part (empty without a figure this round)."""
    if figure is None:
        return ""
    samples = figure.get("samples")
    over = f", over {samples:.0f} samples" if samples is not None else ""
    return (
        f"; federation accuracy {figure['accuracy']:.4f}, loss {figure['loss']:.4f} "
        f"(model of round {figure['round']:.0f}{over})"
    )
