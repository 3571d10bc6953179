"""Whole nodes in one trio process, talking over real loopback TCP with real Noise.

Discovery here is bootstrap plus peer exchange (mDNS has its own tests); every node
bootstraps from the first one and learns the rest through peer exchange.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import trio
from support.tiny_task import TinyTask

from p2pfed.config import NodeConfig
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.group import GroupConfig
from p2pfed.identity import NodeIdentity
from p2pfed.model_vector import model_to_vector
from p2pfed.network import TcpNetwork
from p2pfed.node import CHECKPOINT_FILE_NAME, Node, NodeOptions

GROUP = GroupConfig(group_min=3, group_max=4, initiate_delay=0.02, retry_backoff=0.1)


def make_node(
    tmp_path: Path,
    index: int,
    federation: Federation,
    bootstrap: tuple[str, ...],
    options: NodeOptions,
    max_connections: int = 64,
) -> Node:
    node_dir = tmp_path / f"node{index}"
    node_dir.mkdir(exist_ok=True)
    config = NodeConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        mdns=False,
        bootstrap=bootstrap,
        max_connections=max_connections,
    )
    return Node(
        identity=NodeIdentity.generate(),
        federation=federation,
        config=config,
        node_dir=node_dir,
        network=TcpNetwork(mdns=False),
        task=TinyTask(),
        options=options,
    )


def options_for(index: int, *, training: bool, rounds: int, samples: int) -> NodeOptions:
    return NodeOptions(
        training=training,
        max_rounds=rounds,
        linger=True,
        task_config={"init": index + 1, "samples": samples},
        group=GROUP,
        sync_timeout=0.5,
    )


async def run_federation(
    tmp_path: Path,
    federation: Federation,
    all_options: list[NodeOptions],
    rounds: int,
    timeout: float = 60.0,
    groups: int = 0,
    max_connections: int = 64,
) -> list[Node]:
    """Start the nodes, wait until every one has completed ``rounds`` rounds and ``groups``
    groups (a round number can jump ahead to a group's), then stop them."""
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        first = make_node(tmp_path, 0, federation, (), all_options[0], max_connections)
        port = await nursery.start(first.run)
        nodes.append(first)
        for index, options in enumerate(all_options[1:], start=1):
            node = make_node(
                tmp_path, index, federation, (f"127.0.0.1:{port}",), options, max_connections
            )
            await nursery.start(node.run)
            nodes.append(node)
        with trio.fail_after(timeout):
            while min(node.round for node in nodes) < rounds or (
                min(node.groups_completed for node in nodes) < groups
            ):
                for node in nodes:
                    channels = len(node.connected_peers())
                    assert channels <= max_connections, (node.node_id, channels)
                await trio.sleep(0.05)
        for node in nodes:
            node.request_stop()
    return nodes


def federation(**params: object) -> Federation:
    fed = Federation.new("node-test")
    return dataclasses.replace(fed, params=ProtocolParams(**{"dp_enabled": False, **params}))


async def test_pure_secure_averaging_reaches_the_sample_weighted_mean(tmp_path: Path) -> None:
    samples = [10, 40, 20, 70, 35]
    opts = [options_for(i, training=False, rounds=6, samples=s) for i, s in enumerate(samples)]
    for options in opts:
        # no late-joiner sync: a node adopting an average would replace its own model and
        # break the conservation this test is about (the nodes start one after another)
        options.sync_timeout = 0.0
    # the first exact round waits for all five: an exact group of the first three up gives
    # each of them the group's whole weight, which a later random group would count again
    # (spec/group.md, "Weights": pure averaging conserves the sum over complete rounds)
    fed = federation(min_nodes=5)
    initial = [model_to_vector(TinyTask().build_model({"init": i + 1})) for i in range(5)]
    target = sum(w * x.astype(np.float64) for w, x in zip(samples, initial, strict=True))
    target /= sum(samples)
    nodes = await run_federation(tmp_path, fed, opts, rounds=6, groups=8)
    start_spread = max(np.abs(x - target).max() for x in initial)
    for node in nodes:
        assert node.model is not None
        assert np.all(np.isfinite(node.model))
        assert np.abs(node.model - target).max() < start_spread / 20
        assert node.groups_completed >= 8 and node.round >= 6
        assert (node.node_dir / CHECKPOINT_FILE_NAME).exists()


async def test_training_federation_converges_and_checkpoints(tmp_path: Path) -> None:
    opts = [options_for(i, training=True, rounds=5, samples=10 + i) for i in range(4)]
    nodes = await run_federation(tmp_path, federation(), opts, rounds=5)
    for node in nodes:
        assert node.model is not None
        # training pulls every parameter halfway to 0.5 each round; averaging keeps it there
        assert np.abs(node.model - 0.5).max() < 0.2
        assert node.round >= 5
        assert node.last_metrics  # evaluated


async def test_late_joiner_adopts_an_aggregated_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfed.node")
    fed = federation()
    opts = [options_for(i, training=False, rounds=100, samples=10) for i in range(3)]
    async with trio.open_nursery() as nursery:
        nodes = [make_node(tmp_path, 0, fed, (), opts[0])]
        port = await nursery.start(nodes[0].run)
        for i in (1, 2):
            nodes.append(make_node(tmp_path, i, fed, (f"127.0.0.1:{port}",), opts[i]))
            await nursery.start(nodes[i].run)
        with trio.fail_after(30):
            while min(n.round for n in nodes) < 3:
                await trio.sleep(0.05)
        # Without training, the three hold one average after their first group, and
        # averaging equal models leaves it unchanged: this is the model they serve.
        served = [n.round_loop.aggregated for n in nodes]
        assert all(s is not None for s in served)
        aggregate = served[0][1].copy()  # type: ignore[index]
        for s in served[1:]:
            np.testing.assert_array_equal(s[1], aggregate)  # type: ignore[index]
        late_options = options_for(3, training=False, rounds=100, samples=10)
        late = make_node(tmp_path, 3, fed, (f"127.0.0.1:{port}",), late_options)
        late.options.sync_timeout = 3.0
        await nursery.start(late.run)
        assert late.model is not None and not np.array_equal(late.model, aggregate)
        with trio.fail_after(30):
            while late.round < 1:
                await trio.sleep(0.05)
        for node in [*nodes, late]:
            node.request_stop()
    # Had the late node started from its own model, its first group would have averaged
    # its parameters in; having adopted the served aggregate, nothing moved.
    for node in [*nodes, late]:
        np.testing.assert_array_equal(node.model, aggregate)
    adopted = [r for r in caplog.records if "adopted the aggregated model" in r.getMessage()]
    assert len(adopted) == 1
    assert 3 <= adopted[0].args[0] <= late.round  # type: ignore[index]


async def test_restart_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    fed = federation()
    opts = [options_for(i, training=False, rounds=3, samples=10) for i in range(3)]
    nodes = await run_federation(tmp_path, fed, opts, rounds=3)
    node = nodes[1]
    again = Node(
        identity=node.identity,
        federation=fed,
        config=node.config,
        node_dir=node.node_dir,
        network=TcpNetwork(mdns=False),
        task=TinyTask(),
        options=options_for(1, training=False, rounds=3, samples=10),
    )
    again._prepare_task()
    assert again.round == node.round
    assert again.model is not None and node.model is not None
    np.testing.assert_array_equal(again.model, node.model)


async def test_connection_limit_closes_idle_channels_and_groups_go_on(tmp_path: Path) -> None:
    """Random groups open channels between all their members. With room for only 4
    channels (a group of 4 needs 3), a node closes its longest-idle one for each newcomer
    (spec/discovery.md, "Connection limit") instead of leaving it to time out waiting for
    a slot; every node still completes its rounds, and none ever holds more than 4."""
    opts = [options_for(i, training=False, rounds=5, samples=10) for i in range(8)]
    for options in opts:
        options.sync_timeout = 0.0
        options.target_peers = 2
    nodes = await run_federation(
        tmp_path, federation(), opts, rounds=5, timeout=90.0, max_connections=4
    )
    assert all(node.round >= 5 for node in nodes)
    assert sum(node.channels_trimmed for node in nodes) > 0
