"""Group protocol cores wired together in memory under a virtual clock.

Every message goes through the real CBOR encoding on its way, so tests exercise exactly
what crosses the wire, minus the encryption (tested in the channel tests). Every node is
connected to every live node. ``dead`` nodes neither send nor receive; ``drop`` may
swallow (or act on) a message as it is sent.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import numpy as np

from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import (
    GridPosition,
    GroupAborted,
    GroupCompleted,
    GroupConfig,
    GroupProtocol,
    Send,
)
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import Message, decode_message, encode_message
from simnet.topology import grid_coordinate

FINGERPRINT = bytes(range(32))


class GroupNet:
    """``n`` nodes (or a full ``grid = (side, dims)``: ``side ** dims`` nodes on it)."""

    def __init__(
        self,
        n: int,
        config: GroupConfig,
        params: FixedPointParams,
        model_size: int,
        *,
        seed: int = 0,
        grid: tuple[int, int] | None = None,
        masking: bool = True,
    ) -> None:
        rng = random.Random(seed)
        self.now = 0.0
        self.queue: deque[tuple[NodeId, NodeId, bytes]] = deque()
        self.wire: list[tuple[NodeId, NodeId, bytes]] = []  # every message sent, encoded
        self.dead: set[NodeId] = set()
        self.drop: Callable[[NodeId, NodeId, Message], bool] = lambda s, r, m: False
        self.outcomes: dict[NodeId, list[GroupCompleted | GroupAborted]] = {}
        self.nodes: dict[NodeId, GroupProtocol] = {}
        self.numpy_seeds: dict[NodeId, int] = {}
        self.coordinate: dict[NodeId, tuple[int, ...]] = {}
        identities = [NodeIdentity.from_private_bytes(rng.randbytes(32)) for _ in range(n)]
        for index, identity in enumerate(identities):
            position = None
            if grid is not None:
                position = GridPosition(grid[0], grid_coordinate(index, *grid))
                self.coordinate[identity.node_id] = position.coordinate
            node_rng = random.Random(rng.random())
            self.numpy_seeds[identity.node_id] = rng.randrange(1 << 30)
            self.nodes[identity.node_id] = GroupProtocol(
                identity,
                config,
                params,
                fingerprint=FINGERPRINT,
                model_size=model_size,
                listen_port=7000,
                rng=node_rng,
                randbytes=rng.randbytes,
                numpy_rng=np.random.default_rng(self.numpy_seeds[identity.node_id]),
                masking=masking,
                grid=position,
            )
            self.outcomes[identity.node_id] = []
        for node in self.nodes.values():
            for other in identities:  # what every handshake and NodeAnnounce tells
                node.register_peer(other.node_id, other.public_key)
                if other.node_id in self.coordinate:
                    node.set_peer_grid(other.node_id, self.coordinate[other.node_id])

    def handle(self, sender: NodeId, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                if sender in self.dead or self.drop(sender, action.peer, action.message):
                    continue
                data = encode_message(action.message)
                self.wire.append((sender, action.peer, data))
                self.queue.append((sender, action.peer, data))
            else:
                self.outcomes[sender].append(action)

    def connected(self, node_id: NodeId) -> list[NodeId]:
        return [p for p in self.nodes if p != node_id and p not in self.dead]

    def run(self, until: float, step: float = 0.01) -> None:
        while self.now < until:
            for node_id, node in self.nodes.items():
                if node_id not in self.dead:
                    self.handle(node_id, node.poll(self.now, self.connected(node_id)))
            while self.queue:
                sender, receiver, data = self.queue.popleft()
                if receiver in self.dead:
                    continue
                message = decode_message(data, borrow=True)
                self.handle(receiver, self.nodes[receiver].receive(sender, message, self.now))
            self.now += step

    def offer(
        self, vectors: dict[NodeId, np.ndarray], weights: dict[NodeId, int], round_: int = 1
    ) -> None:
        for node_id, node in self.nodes.items():
            if node_id not in self.dead:
                node.set_contribution(vectors[node_id], weights[node_id], round_, self.now)

    def sent(self, kind: type[Message]) -> list[tuple[NodeId, NodeId, Message]]:
        """``(sender, receiver, message)`` for every message of type ``kind`` sent so far."""
        decoded = ((s, r, decode_message(data)) for s, r, data in self.wire)
        return [(s, r, m) for s, r, m in decoded if isinstance(m, kind)]

    def completed(self, node_id: NodeId) -> list[GroupCompleted]:
        return [o for o in self.outcomes[node_id] if isinstance(o, GroupCompleted)]
