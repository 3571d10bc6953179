"""The round loop alone (p2pfed/round_loop.py): no node, no channels, no sockets.

Three loops run their rounds under trio's MockClock, each through its own group driver;
the drivers exchange the group protocol's messages over an in-memory wire (encoded and
decoded with the real CBOR codec), the group protocols mask and unmask for real, and the
checkpoints are real files. The task trains every parameter to a value of our choosing
and declares the weight, so each round's exact FedAvg mean is known in advance.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio
import trio.testing

from p2pfed.checkpoint import load_checkpoint
from p2pfed.checkpoint_writer import (
    CHECKPOINT_FILE_NAME,
    SERVER_OPTIMIZER_FILE_NAME,
    CheckpointWriter,
)
from p2pfed.dp_release import PrivateRelease
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.group import GroupConfig, GroupProtocol
from p2pfed.group_driver import DriverLinks, GroupDriver
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import Message, decode_message, encode_message
from p2pfed.model_vector import model_to_vector
from p2pfed.node import NodeOptions
from p2pfed.peers import PeerTable
from p2pfed.round_loop import LoopLinks, RoundLoop, RoundReport
from p2pfed.round_rules import fixed_point_of
from p2pfed.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from p2pfed.task import NodeData, RoundContext, TrainResult

FINGERPRINT = bytes(range(32))
GROUP = GroupConfig(group_min=3, group_max=3)
FILLS = [0.5, 1.0, 2.0]  # what node i trains every parameter to in round 0 (+1 a round)
SAMPLES = [10, 30, 60]  # num_train: the weight when the task declares none


class FillTask:
    """Training sets every parameter to ``fill + round`` and declares ``weights[round]``
    (None: the number of training records); evaluation reports the mean parameter."""

    name = "fill-v1"

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        return model

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        x = torch.zeros(1, 3)
        return NodeData(train=x, test=x, num_train=int(config["samples"]), num_test=1)

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext,
    ) -> TrainResult:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float(config["fill"]) + context.round)
        weights = config.get("weights", {})
        return TrainResult(samples=data.num_train, loss=0.0, weight=weights.get(context.round))

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        values = torch.cat([p.detach().flatten() for p in model.parameters()])
        return {"mean": float(values.mean())}


@dataclass
class Member:
    loop: RoundLoop
    node_dir: Path
    reports: list[RoundReport] = field(default_factory=list)
    on_disk: list[tuple[int, np.ndarray]] = field(default_factory=list)
    """The checkpoint file's round and model when each round was reported."""


def federation(**params: Any) -> Federation:
    settings: dict[str, Any] = {"dp_enabled": False, "group_min": 3, "group_max": 3}
    settings["federation_metrics"] = False
    return Federation(
        name="loop",
        federation_id=bytes(16),
        secret=bytes(32),
        params=ProtocolParams(**{**settings, **params}),
    )


def run_loops(
    tmp_path: Path,
    fed: Federation,
    rounds: int,
    weights: list[dict[int, int]] | None = None,
) -> list[Member]:
    """Run three round loops to ``rounds`` rounds over an in-memory wire."""
    people = [NodeIdentity.from_private_bytes(random.Random(i).randbytes(32)) for i in range(3)]
    ids = [p.node_id for p in people]
    task = FillTask()
    fixed_point = fixed_point_of(fed, GROUP.group_max)
    members: list[Member] = []

    async def main() -> None:
        wire_send, wire = trio.open_memory_channel[tuple[NodeId, NodeId, bytes]](10_000)
        drivers: dict[NodeId, GroupDriver] = {}
        for index, person in enumerate(people):
            me = person.node_id
            others = [p for p in ids if p != me]
            node_dir = tmp_path / f"node{index}"
            node_dir.mkdir()

            def send(peer: NodeId, message: Message, address: object, me: NodeId = me) -> None:
                wire_send.send_nowait((me, peer, encode_message(message)))

            def connected(others: list[NodeId] = others) -> list[NodeId]:
                return list(others)

            loops: list[RoundLoop] = []

            def current_round(loops: list[RoundLoop] = loops) -> int:
                return loops[0].round

            driver = GroupDriver(
                GROUP,
                PeerTable(me),
                DriverLinks(send=send, connected=connected),
                current_round=current_round,
            )
            member_weights = weights[index] if weights is not None else {}
            options = NodeOptions(
                max_rounds=rounds,
                threads=False,
                sync_timeout=0.0,
                task_config={"fill": FILLS[index], "samples": SAMPLES[index]}
                | {"weights": member_weights},
            )
            reports: list[RoundReport] = []
            on_disk: list[tuple[int, np.ndarray]] = []

            def on_round(
                report: RoundReport,
                node_dir: Path = node_dir,
                reports: list[RoundReport] = reports,
                on_disk: list[tuple[int, np.ndarray]] = on_disk,
            ) -> None:
                checkpoint = load_checkpoint(
                    node_dir / CHECKPOINT_FILE_NAME, expected_fingerprint=FINGERPRINT
                )
                assert checkpoint is not None, f"round {report.round} reported, no checkpoint"
                on_disk.append((checkpoint.round, checkpoint.model))
                reports.append(report)

            loop = RoundLoop(
                node_id=me,
                federation=fed,
                task=task,
                options=options,
                group_config=GROUP,
                fixed_point=fixed_point,
                exact=fed.params.averaging == "exact",
                driver=driver,
                privacy=PrivateRelease(fed, fixed_point, node_dir, threads=False),
                checkpoints=CheckpointWriter(node_dir, threads=False),
                links=LoopLinks(connected=connected, known_peers=lambda: 2),
                stop=trio.Event(),
                rng=random.Random(100 + index),
                randbytes=random.Random(200 + index).randbytes,
                on_round=on_round,
            )
            loops.append(loop)
            members.append(Member(loop, node_dir, reports, on_disk))
            torch_model = task.build_model(options.task_config)
            loop.begin(model_to_vector(torch_model), FINGERPRINT, SAMPLES[index])
            rng = random.Random(300 + index)
            group = GroupProtocol(
                person,
                GROUP,
                fixed_point,
                fingerprint=FINGERPRINT,
                model_size=loop.vector_size(),
                listen_port=7447,
                rng=rng,
                randbytes=rng.randbytes,
                numpy_rng=np.random.default_rng(index),
                exact=loop.exact,
            )
            for other in people:  # what every handshake tells
                if other is not person:
                    group.register_peer(other.node_id, other.public_key)
            driver.start(group)
            drivers[me] = driver

        async def pump() -> None:
            async for sender, receiver, data in wire:
                drivers[receiver].receive(sender, decode_message(data))

        async def member_run(member: Member) -> None:
            task_config = member.loop.options.task_config
            data = task.load_data(task_config)
            await member.loop.run(task.build_model(task_config), data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            for driver in drivers.values():
                nursery.start_soon(driver.loop)
            with trio.fail_after(600):
                async with trio.open_nursery() as runs:
                    for member in members:
                        runs.start_soon(member_run, member)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return members


def fedavg(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


@pytest.mark.parametrize("averaging", ["exact", "random"])
def test_a_round_leaves_every_loop_the_weighted_fedavg_mean(tmp_path: Path, averaging: str) -> None:
    # round 1: the records' counts weigh; round 2: node 1 declares 5, node 2 declares 0
    weights = [{}, {1: 5}, {1: 0}]
    extra = {"random_steps": 1} if averaging == "random" else {}
    members = run_loops(tmp_path, federation(averaging=averaging, **extra), 2, weights)
    first = fedavg(FILLS, SAMPLES)
    second = fedavg([f + 1 for f in FILLS], [SAMPLES[0], 5, 0])
    for member in members:
        loop = member.loop
        assert [r.round for r in member.reports] == [1, 2]
        assert loop.round == 2 and loop.local_rounds == 2
        assert loop.model is not None
        np.testing.assert_allclose(loop.model, second, rtol=0, atol=1e-6)
        # the evaluations were of the averaged models of rounds 1 and 2
        means = [r.metrics["mean"] for r in member.reports]
        np.testing.assert_allclose(means, [first, second], rtol=0, atol=1e-6)
        assert loop.last_metrics["mean"] == pytest.approx(second, abs=1e-6)
        assert all(r.group_size == 3 for r in member.reports)
    if averaging == "exact":
        # the block weight of a group of all nodes: the round's total weight
        assert all(m.loop.weight == SAMPLES[0] + 5 for m in members)
        assert all(r.nodes == 3 and r.coverage == 3 for m in members for r in m.reports)
    else:
        # push-sum: the members' integer shares of the group's total
        assert sum(m.loop.weight for m in members) == SAMPLES[0] + 5


def test_the_round_weight_rule(tmp_path: Path) -> None:
    fed = federation(fixed_point_bits=32)
    fixed_point = fixed_point_of(fed, GROUP.group_max)

    def nowhere(peer: NodeId, message: Message, address: object) -> None:
        raise AssertionError("the rule needs no peer")

    def loop_of(fed: Federation, *, exact: bool, training: bool = True) -> RoundLoop:
        identity = NodeIdentity.from_private_bytes(bytes(32))
        links = DriverLinks(send=nowhere)
        driver = GroupDriver(GROUP, PeerTable(identity.node_id), links, current_round=lambda: 0)
        node_dir = tmp_path / f"n{len(list(tmp_path.iterdir()))}"
        node_dir.mkdir()
        loop = RoundLoop(
            node_id=identity.node_id,
            federation=fed,
            task=FillTask(),
            options=NodeOptions(threads=False, training=training),
            group_config=GROUP,
            fixed_point=fixed_point,
            exact=exact,
            driver=driver,
            privacy=PrivateRelease(fed, fixed_point, node_dir, threads=False),
            checkpoints=CheckpointWriter(node_dir, threads=False),
            links=LoopLinks(),
            stop=trio.Event(),
            rng=random.Random(0),
        )
        loop.begin(np.zeros(4, np.float32), FINGERPRINT, 40)
        return loop

    def trained(weight: int | None = None) -> TrainResult:
        return TrainResult(samples=40, loss=0.0, weight=weight)

    exact = loop_of(fed, exact=True)
    assert exact.weight == exact.training_weight == 40  # the initial model's: num_train
    assert exact._round_weight(trained(), finished=False) == 40
    assert exact._round_weight(trained(7), finished=False) == 7
    assert exact._round_weight(trained(), finished=False) == 7  # the last declared stays
    cap = fixed_point.max_weight
    assert exact._round_weight(trained(cap + 5), finished=False) == cap  # the ring's limit
    # a node of an exact round that did not train adds nothing, whether finished or not
    assert exact._round_weight(None, finished=True) == 0
    assert exact._round_weight(None, finished=False) == 0
    # random rounds, or pure averaging: the weight of the model held (push-sum)
    random_loop = loop_of(fed, exact=False)
    random_loop.weight = 13
    assert random_loop._round_weight(None, finished=True) == 13
    averaging = loop_of(fed, exact=True, training=False)
    averaging.weight = 21
    assert averaging._round_weight(None, finished=False) == 21
    # with DP on, 1 whatever the data (a count would disclose it)
    dp_fed = federation(fixed_point_bits=32, dp_enabled=True)
    private = loop_of(dp_fed, exact=True)
    assert private.weight == 1 and private._round_weight(trained(7), finished=False) == 1


def test_the_server_step_is_applied_once_a_round_and_checkpointed_first(tmp_path: Path) -> None:
    fed = federation(server_optimizer="fedavgm", server_lr=0.5, server_momentum=0.9)
    members = run_loops(tmp_path, fed, 3)
    # the reference: spec/server-optimizer.md's FedAvgM, once a round, from the zero model
    x, m = 0.0, 0.0
    expected = []
    for round_ in range(3):
        average = fedavg([f + round_ for f in FILLS], SAMPLES)
        m = 0.9 * m + (average - x)
        x = x + 0.5 * m
        expected.append(x)
    assert len(set(np.round(expected, 6))) == 3 and expected[-1] != pytest.approx(average)
    for member in members:
        loop = member.loop
        assert loop.model is not None and loop.server_optimizer is not None
        np.testing.assert_allclose(loop.model, expected[-1], rtol=0, atol=1e-5)
        assert loop.server_optimizer.round == 3
        means = [r.metrics["mean"] for r in member.reports]
        np.testing.assert_allclose(means, expected, rtol=0, atol=1e-5)
        # each round's checkpoint was on disk before the round was reported
        assert [round_ for round_, _ in member.on_disk] == [1, 2, 3]
        for (_, model), value in zip(member.on_disk, expected, strict=True):
            np.testing.assert_allclose(model, value, rtol=0, atol=1e-5)
        # and the optimiser's state of that same round beside it
        settings = ServerOptimizerSettings.from_params(fed.params)
        state = ServerOptimizer.load(member.node_dir / SERVER_OPTIMIZER_FILE_NAME, 8, settings)
        assert state is not None and state.round == 3


def test_the_round_loop_loads_nothing_of_the_network() -> None:
    code = "import json, sys, p2pfed.round_loop; print(json.dumps(sorted(sys.modules)))"
    root = Path(__file__).resolve().parent.parent
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, cwd=root, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    network = {"p2pfed.node", "p2pfed.network", "p2pfed.channel_pool", "p2pfed.trio_channel"}
    network |= {"p2pfed.channel", "p2pfed.noise", "p2pfed.discovery", "zeroconf"}
    assert "p2pfed.round_loop" in loaded and not network & loaded
