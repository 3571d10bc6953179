"""Random rounds keep pace (spec/group.md, "Random rounds", *Pace*): a node does not train
round ``r`` while a connected peer is still at round ``r - 1``.

Real nodes over loopback TCP in one trio process; one node trains slowly (its task sleeps
in the worker thread), as a node with ten times the data would. Without pacing the fast
nodes race rounds ahead and average mostly among themselves; with it no node is ever more
than one round ahead of another.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import trio
from support.tiny_task import TinyTask

from p2pfed.config import NodeConfig
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.group import GroupConfig
from p2pfed.identity import NodeIdentity
from p2pfed.network import TcpNetwork
from p2pfed.node import Node, NodeOptions
from p2pfed.task import NodeData, RoundContext, TrainResult

ROUNDS = 5


class SlowTinyTask(TinyTask):
    """The tiny task, whose training takes ``train_seconds`` of wall time."""

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext,
    ) -> TrainResult:
        time.sleep(float(config.get("train_seconds", 0.0)))
        return super().train(model, data, config, generator, context)


async def _largest_gap(tmp_path: Path, pace_timeout: float) -> int:
    """Run one slow and four fast nodes until the slow one has done ``ROUNDS`` rounds;
    the largest lead in completed rounds any node had over another meanwhile."""
    federation = dataclasses.replace(
        Federation.new("pace-test"),
        params=ProtocolParams(dp_enabled=False, averaging="random", random_steps=1),
    )
    group = GroupConfig(group_min=3, group_max=4, initiate_delay=0.02, retry_backoff=0.1)
    nodes: list[Node] = []
    gap = 0
    async with trio.open_nursery() as nursery:
        port = 0
        for index in range(5):
            node_dir = tmp_path / f"pace{pace_timeout:g}-{index}"
            node_dir.mkdir()
            node = Node(
                identity=NodeIdentity.generate(),
                federation=federation,
                config=NodeConfig(
                    listen_host="127.0.0.1",
                    listen_port=0,
                    mdns=False,
                    bootstrap=(f"127.0.0.1:{port}",) if index else (),
                ),
                node_dir=node_dir,
                network=TcpNetwork(mdns=False),
                task=SlowTinyTask(),
                options=NodeOptions(
                    max_rounds=ROUNDS,
                    linger=True,
                    task_config={
                        "init": index + 1,
                        "samples": 10,
                        "train_seconds": 0.4 if index == 0 else 0.0,
                    },
                    group=group,
                    sync_timeout=0.0,
                    pace_timeout=pace_timeout,
                ),
            )
            started = await nursery.start(node.run)
            port = port or started
            nodes.append(node)
        slow = nodes[0]
        with trio.fail_after(90):
            while slow.round < ROUNDS:
                rounds = [min(node.round, ROUNDS) for node in nodes]
                gap = max(gap, max(rounds) - min(rounds))
                await trio.sleep(0.01)
        for node in nodes:
            node.request_stop()
    return gap


async def test_no_node_runs_more_than_a_round_ahead_of_a_slow_peer(tmp_path: Path) -> None:
    assert await _largest_gap(tmp_path, pace_timeout=10.0) <= 1


async def test_without_pacing_fast_nodes_race_ahead(tmp_path: Path) -> None:
    """The control: the same federation with pacing off drifts apart (so the test above
    measures the rule, not the task's speeds)."""
    assert await _largest_gap(tmp_path, pace_timeout=0.0) >= 3
