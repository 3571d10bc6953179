"""Flower's FedAvg on the convergence task: a real server and clients over gRPC on loopback.

Started by ``bench/convergence.py`` as separate processes (``python -m bench._flower server
...`` once, then ``python -m bench._flower client ...`` per client), with the legacy
``flwr.server.start_server`` / ``flwr.client.start_client`` API (deprecated since Flower
1.13 in favour of SuperLink/SuperNode, still shipped in 1.42). Flower is optional: without
it ``bench/convergence.py`` skips this part.

Rules of this file:

* The clients are plain ``NumPyClient`` s around the same task as the p2pfed nodes
  (``p2pfed.tasks.digits_cnn``): same partition, initial model and batch order (round
  ``r`` of Flower, counted from 1, is p2pfed's round ``r - 1``).
* The server runs Flower's own ``FedAvg`` (sample-weighted by ``num_examples``), with one
  change in *order* only: the fit results are sorted by client index before Flower
  aggregates them, as the reference replay sums in that order (Flower itself sums them in
  the order the replies arrived, which makes float sums differ in the last bits from run to
  run). The arithmetic is Flower's.
* The global model is evaluated on the server after every round (Flower's ``evaluate_fn``)
  on the common test set; the server prints one JSON line per round to stdout
  (``{"round": r, "accuracy": ..., "loss": ..., "time": ...}``) and a final
  ``{"done": true}``.
* Telemetry off (``FLWR_TELEMETRY_ENABLED=0``, set before Flower is imported): these
  machines must not talk to anything beyond loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import torch

from bench._fedsim import Setup
from p2pfed.task import RoundContext
from p2pfed.tasks.digits_cnn import task

__all__ = ["main"]


def _setup(text: str) -> Setup:
    raw = json.loads(text)
    return Setup(
        num_nodes=raw["num_nodes"],
        rounds=raw["rounds"],
        seed=raw["seed"],
        task_settings=raw["task_settings"],
    )


def _arrays(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def _load(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    with torch.no_grad():
        for parameter, array in zip(model.parameters(), arrays, strict=True):
            parameter.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))


def run_client(setup: Setup, index: int, address: str) -> None:
    """One Flower client: train the task's local steps on client ``index``'s data."""
    import flwr.client

    torch.set_num_threads(1)
    config = setup.config(index)
    data = task.load_data(config)
    model = task.build_model(config)

    class Client(flwr.client.NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return _arrays(model)

        def fit(
            self, parameters: list[np.ndarray], fit_config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            _load(model, parameters)
            round_index = int(fit_config["server_round"]) - 1
            context = RoundContext(round=round_index, local_round=round_index)
            task.train(model, data, config, torch.Generator(), context)
            return _arrays(model), data.num_train, {"index": index}

    flwr.client.start_client(server_address=address, client=Client().to_client(), insecure=True)


def run_server(setup: Setup, address: str) -> None:
    """Flower's server with FedAvg for ``setup.rounds`` rounds; progress on stdout."""
    import flwr.common
    import flwr.server
    from flwr.server.strategy import FedAvg

    torch.set_num_threads(1)
    probe = task.build_model(setup.config(0))
    test_data = task.load_data(setup.config(0))

    def evaluate_fn(
        server_round: int, arrays: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        _load(probe, arrays)
        metrics = task.evaluate(probe, test_data, setup.config(0))
        line = {"round": server_round, **metrics, "time": time.time()}
        print(json.dumps(line), flush=True)
        return metrics["loss"], {"accuracy": metrics["accuracy"]}

    class SortedFedAvg(FedAvg):
        """Flower's FedAvg, given the replies in client order (module docstring)."""

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            ordered = sorted(results, key=lambda pair: int(pair[1].metrics["index"]))
            return super().aggregate_fit(server_round, ordered, failures)

    strategy = SortedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=setup.num_nodes,
        min_evaluate_clients=0,
        min_available_clients=setup.num_nodes,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda server_round: {"server_round": server_round},
        initial_parameters=flwr.common.ndarrays_to_parameters(_arrays(probe)),
        accept_failures=False,
    )
    flwr.server.start_server(
        server_address=address,
        config=flwr.server.ServerConfig(num_rounds=setup.rounds),
        strategy=strategy,
    )
    print(json.dumps({"done": True}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._flower")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--address", required=True, help="HOST:PORT of the server")
    parser.add_argument("--setup", required=True, help="the Setup as JSON")
    parser.add_argument("--index", type=int, default=0, help="client index")
    args = parser.parse_args(argv)
    setup = _setup(args.setup)
    if args.role == "server":
        run_server(setup, args.address)
    else:
        run_client(setup, args.index, args.address)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
