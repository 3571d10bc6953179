"""Federation-wide metrics under secure aggregation (spec/group.md, "Federation metrics").

Whole nodes over real loopback TCP with real Noise and real masks: each node's evaluation
differs (its own accuracy scale, loss offset and number of test samples), and every node
must learn the sample-weighted combination of all of them, for the model of one round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio
from support.tiny_task import TinyTask

from p2pfed.config import NodeConfig
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.group import GroupConfig
from p2pfed.identity import NodeIdentity
from p2pfed.network import TcpNetwork
from p2pfed.node import Node, NodeOptions, RoundReport
from p2pfed.round_loop import EVALUATION_WORDS
from p2pfed.status import StatusWriter, format_status, read_status
from p2pfed.task import NodeData

GROUP = GroupConfig(group_min=3, group_max=4, initiate_delay=0.02, retry_backoff=0.1)
TRAIN = [10, 40, 20, 70, 15, 33, 50, 12, 64]
TEST = [5, 17, 30, 8, 11, 3, 25, 9, 40]
SCALE = [0.9, 0.6, 0.3, 0.75, 0.5, 0.95, 0.2, 0.65, 0.4]  # accuracy: scale / (1 + mse)
OFFSET = [0.0, 1.0, 2.5, 0.5, 0.25, 3.0, 1.5, 0.75, 2.0]  # loss: mse + offset


class EvalTask(TinyTask):
    """The tiny task, with an evaluation that differs per node and per round."""

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        x = torch.ones(1, int(config.get("width", 8)))
        return NodeData(
            train=x, test=x, num_train=int(config["samples"]), num_test=int(config["test"])
        )

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        values = torch.cat([p.detach().flatten() for p in model.parameters()])
        mse = float(((values - 0.5) ** 2).mean())
        return {"accuracy": float(config["scale"]) / (1 + mse), "loss": mse + config["offset"]}


async def run_nodes(
    tmp_path: Path,
    federation: Federation,
    rounds: int,
    sync_timeout: float = 0.5,
    count: int = 4,
    group: GroupConfig = GROUP,
) -> tuple[list[Node], list[list[RoundReport]]]:
    reports: list[list[RoundReport]] = [[] for _ in range(count)]
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        bootstrap: tuple[str, ...] = ()
        for index in range(count):
            node_dir = tmp_path / f"node{index}"
            node_dir.mkdir()
            node = Node(
                identity=NodeIdentity.generate(),
                federation=federation,
                config=NodeConfig(
                    listen_host="127.0.0.1", listen_port=0, mdns=False, bootstrap=bootstrap
                ),
                node_dir=node_dir,
                network=TcpNetwork(mdns=False),
                task=EvalTask(),
                options=NodeOptions(
                    max_rounds=rounds,
                    linger=True,
                    task_config={
                        "init": index + 1,
                        "samples": TRAIN[index],
                        "test": TEST[index],
                        "scale": SCALE[index],
                        "offset": OFFSET[index],
                    },
                    group=group,
                    sync_timeout=sync_timeout,
                ),
                on_round=reports[index].append,
            )
            port = await nursery.start(node.run)
            bootstrap = bootstrap or (f"127.0.0.1:{port}",)
            nodes.append(node)
        with trio.fail_after(180):
            while min(node.round for node in nodes) < rounds:
                await trio.sleep(0.05)
        for node in nodes:
            node.request_stop()
    return nodes, reports


def expected_figures(reports: list[list[RoundReport]], round_: int) -> tuple[float, float, int]:
    """Accuracy, loss and samples over every node's own evaluation of round ``round_``."""
    correct = loss_sum = 0.0
    samples = 0
    for index, node_reports in enumerate(reports):
        own = [r.metrics for r in node_reports if r.round == round_ and r.metrics]
        if own:
            correct += own[0]["accuracy"] * TEST[index]
            loss_sum += own[0]["loss"] * TEST[index]
            samples += TEST[index]
    return correct / samples, loss_sum / samples, samples


def federation(**params: Any) -> Federation:
    fed = Federation.new("federation-metrics-test")
    return dataclasses.replace(fed, params=ProtocolParams(**{"dp_enabled": False, **params}))


@pytest.mark.parametrize("averaging", ["exact", "random"])
async def test_every_node_learns_the_sample_weighted_federation_figures(
    tmp_path: Path, averaging: str
) -> None:
    rounds = 4
    # random rounds: no adopting of a peer's later model at start, so that every node
    # trains and evaluates its rounds (exact rounds keep the default: a node behind catches up)
    sync = 0.5 if averaging == "exact" else 0.0
    nodes, reports = await run_nodes(tmp_path, federation(averaging=averaging), rounds, sync)
    for node, node_reports in zip(nodes, reports, strict=True):
        figures = [r for r in node_reports if r.federation is not None and r.round <= rounds]
        # round 1 has no evaluation to share; rounds 2.. carry the previous round's
        assert len(figures) >= (rounds - 1 if averaging == "exact" else 1), node_reports
        for report in figures:
            figure = report.federation
            assert figure is not None
            assert figure["round"] == report.round - 1
            if averaging == "exact":
                accuracy, loss, samples = expected_figures(reports, int(figure["round"]))
                own = next(r.metrics for r in node_reports if r.round == figure["round"])
                # the exact sum of every node's words: fixed-point error only
                assert figure["samples"] == samples == sum(TEST[: len(nodes)])
                assert figure["accuracy"] == pytest.approx(accuracy, rel=1e-6)
                assert figure["loss"] == pytest.approx(loss, rel=1e-6)
                assert abs(figure["accuracy"] - own["accuracy"]) > 0.01  # not its own figure
            else:
                # push-sum estimates over groups whose members' rounds may differ (random
                # rounds are not in step): a sample-weighted mixture of the nodes' own
                # figures, so within their range, and no sample count
                assert "samples" not in figure
                for key in ("accuracy", "loss"):
                    values = [r.metrics[key] for rs in reports for r in rs if r.metrics]
                    assert min(values) <= figure[key] <= max(values)
                    own_then = [r.metrics[key] for r in node_reports if r.round == figure["round"]]
                    assert all(abs(figure[key] - v) > 0.01 for v in own_then)
        assert node.federation_metrics is not None
        assert node.model is not None and node.group is not None
        # the model is still the model: the words are averaged beside it, never in it
        assert node.group.model_size == len(node.model) + EVALUATION_WORDS


def test_dp_federation_shares_no_evaluation_sums() -> None:
    params = ProtocolParams(dp_enabled=True)
    assert params.federation_metrics and not params.federation_metrics_active
    assert not ProtocolParams(dp_enabled=False, federation_metrics=False).federation_metrics_active
    assert ProtocolParams(dp_enabled=False).federation_metrics_active


async def test_federation_without_metrics_averages_the_bare_model(tmp_path: Path) -> None:
    nodes, reports = await run_nodes(tmp_path, federation(federation_metrics=False), 2)
    for node, node_reports in zip(nodes, reports, strict=True):
        assert node.federation_metrics is None
        assert all(r.federation is None for r in node_reports)
        assert node.model is not None and node.group is not None
        assert node.group.model_size == len(node.model)
        assert np.all(np.isfinite(node.model))


def test_status_shows_own_and_federation_figures(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path, node_id="n", wall_clock=lambda: 0.0)
    writer.update(
        1.0,
        force=True,
        accuracy=0.8,
        loss=0.5,
        federation={"accuracy": 0.7125, "loss": 0.61, "round": 3.0, "samples": 60.0},
        federation_metrics="on",
    )
    status = read_status(tmp_path)
    assert status["federation"] == {"accuracy": 0.7125, "loss": 0.61, "round": 3, "samples": 60}
    text = format_status(status)
    assert "  model:      accuracy 80.00 %, loss 0.5000" in text
    assert (
        "  federation: accuracy 71.25 %, loss 0.6100 (model of round 3, over 60 test samples "
        "of all members)"
    ) in text
    status["federation"] = None
    assert "  federation: not measured yet" in format_status(status)
    status["federation_metrics"] = "off-dp"
    assert "federation: not shared (differential privacy is on" in format_status(status)
    del status["federation_metrics"]  # a file from before the feature: no line at all
    assert "federation:" not in format_status(status)
    with pytest.raises(ValueError, match="federation_metrics"):
        writer.update(2.0, federation_metrics="maybe")


async def test_exact_round_of_two_steps_carries_the_sums_exactly(tmp_path: Path) -> None:
    # 9 nodes in groups of 3: two steps, the second summing the first's integer sums
    group = GroupConfig(group_min=3, group_max=3, initiate_delay=0.02, retry_backoff=0.1)
    fed = federation(group_max=3, min_nodes=9)
    nodes, reports = await run_nodes(tmp_path, fed, rounds=3, count=9, group=group)
    for node, node_reports in zip(nodes, reports, strict=True):
        assert node.federation_metrics is not None
        figures = [r for r in node_reports if r.federation is not None and r.steps == 2]
        assert figures, node_reports
        for report in figures:
            figure = report.federation
            assert figure is not None
            accuracy, loss, samples = expected_figures(reports, int(figure["round"]))
            # float32 words: each within 2^-24 of its value, then summed exactly
            assert figure["samples"] == samples == sum(TEST)
            assert figure["accuracy"] == pytest.approx(accuracy, rel=1e-6)
            assert figure["loss"] == pytest.approx(loss, rel=1e-6)


def unstarted_node(tmp_path: Path, **params: Any) -> Node:
    node = Node(
        identity=NodeIdentity.generate(),
        federation=federation(**params),
        config=NodeConfig(listen_host="127.0.0.1", listen_port=0, mdns=False),
        node_dir=tmp_path,
        network=TcpNetwork(mdns=False),
        task=EvalTask(),
        options=NodeOptions(group=GROUP),
    )
    node.model = np.zeros(5, np.float32)
    node.round = 2
    return node


def test_words_beyond_the_clip_are_scaled_together_and_keep_the_figures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = unstarted_node(tmp_path, clip=4.0)
    loop = node.round_loop
    loop._evaluated = (2, {"accuracy": 0.75, "loss": 3.0}, 100)  # 100 test samples, weight 5
    vector = loop._with_evaluation_words(np.ones(5, np.float32), 5)
    words = vector[-EVALUATION_WORDS:]
    assert np.abs(words).max() <= 4.0  # else the encoder would clip one word alone
    assert words[0] / words[2] == pytest.approx(0.75) and words[1] / words[2] == pytest.approx(3)
    assert "exceed the federation's clip" in caplog.text
    assert np.array_equal(loop._adopt(vector, None), np.ones(5, np.float32))
    assert node.federation_metrics == {
        "accuracy": pytest.approx(0.75),
        "loss": pytest.approx(3.0),
        "round": 2.0,
    }


def test_no_evaluation_of_this_rounds_model_contributes_zeros(tmp_path: Path) -> None:
    node = unstarted_node(tmp_path)
    loop = node.round_loop
    model = np.ones(5, np.float32)
    loop._evaluated = (1, {"accuracy": 0.5, "loss": 1.0}, 10)  # of an older model
    assert not loop._with_evaluation_words(model, 5)[-EVALUATION_WORDS:].any()
    loop._evaluated = (2, {"loss": 1.0}, 10)  # no accuracy
    assert not loop._with_evaluation_words(model, 5)[-EVALUATION_WORDS:].any()
    loop._evaluated = (2, {"accuracy": 0.5, "loss": 1.0}, 10)
    assert not loop._with_evaluation_words(model, 0)[-EVALUATION_WORDS:].any()  # weight 0
    assert loop._with_evaluation_words(model, 5)[-EVALUATION_WORDS:].tolist() == [1.0, 2.0, 2.0]
    loop._adopt(np.zeros(5 + EVALUATION_WORDS, np.float32), None)
    assert node.federation_metrics is None  # nobody evaluated: no figure
    dp_loop = unstarted_node(tmp_path, dp_enabled=True).round_loop
    assert dp_loop._with_evaluation_words(model, 5) is model
