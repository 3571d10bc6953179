"""Exact rounds (spec/group.md, "Exact rounds"): plans, member indices, weight shares."""

from __future__ import annotations

import hashlib

import numpy as np

from p2pfed.exact_rounds import member_indices, plan_sizes, round_plan, sitting_out
from p2pfed.group import GroupCompleted
from p2pfed.identity import NodeId

NAME = "exact_rounds"
SECTION = 'spec/group.md, "Exact rounds" and "Weights"'
DESCRIPTION = (
    "group-size plans, who sits a round out, member indices after a group, push-sum shares"
)

_PLANS = [
    (1, 3, 8),
    (3, 3, 8),
    (8, 3, 8),
    (8, 3, 4),
    (11, 3, 8),
    (12, 3, 4),
    (16, 3, 8),
    (24, 3, 8),
    (27, 3, 4),
    (64, 3, 8),
    (100, 3, 8),
    (729, 3, 9),
    (1000, 3, 10),
]


def _node_id(i: int) -> bytes:
    return hashlib.sha256(b"exact-rounds-vector-node:" + bytes([i])).digest()


def generate() -> dict:
    plans = [
        {
            "n": n,
            "group_min": lo,
            "group_max": hi,
            "sizes": list(plan_sizes(n, group_min=lo, group_max=hi)),
        }
        for n, lo, hi in _PLANS
    ]
    indices = []
    for k in (3, 4, 8):
        group_id = hashlib.sha256(b"exact-rounds-vector-group:" + bytes([k])).digest()[:16]
        members = sorted(_node_id(i) for i in range(k))
        assigned = member_indices(group_id, members)
        indices.append(
            {
                "group_id": group_id.hex(),
                "members": [m.hex() for m in members],
                "indices": [assigned[m] for m in members],
            }
        )
    shares = []
    for total, k in ((10, 3), (12, 4), (3, 3), (1001, 8)):
        ids = tuple(NodeId(_node_id(i)) for i in range(k))
        done = GroupCompleted(bytes(16), 0, tuple(sorted(ids)), np.zeros(1, np.float32), total)
        shares.append(
            {"total_weight": total, "k": k, "shares": [done.share(m) for m in done.members]}
        )
    members = sorted(_node_id(i) for i in range(11))
    sit_out = []
    for round_ in (0, 1, 41):
        plan = round_plan(11, group_min=3, group_max=8)
        out = sitting_out(round_, members, plan.sitting_out)
        sit_out.append(
            {
                "round": round_,
                "members": [m.hex() for m in members],
                "group_min": 3,
                "group_max": 8,
                "participants": plan.participants,
                "sizes": list(plan.sizes),
                "sitting_out": sorted(m.hex() for m in out),
            }
        )
    return {"plans": plans, "indices": indices, "shares": shares, "sit_out": sit_out}


def verify(vectors: dict) -> None:
    """Recompute indices and shares from the spec's formulas alone."""
    for case in vectors["indices"]:
        group_id = bytes.fromhex(case["group_id"])
        members = [bytes.fromhex(m) for m in case["members"]]
        digest = {
            m: hashlib.sha256(b"p2pfed-exact-index:v1\x00" + group_id + m).digest() for m in members
        }
        ranked = sorted(members, key=lambda m: digest[m])
        assert [ranked.index(m) for m in members] == case["indices"]
    for case in vectors["shares"]:
        w, k = case["total_weight"], case["k"]
        assert case["shares"] == [w // k + (1 if j < w % k else 0) for j in range(k)]
        assert sum(case["shares"]) == w
    for case in vectors["sit_out"]:
        members = [bytes.fromhex(m) for m in case["members"]]
        prefix = b"p2pfed-exact-sit-out:v1\x00" + case["round"].to_bytes(8, "big")
        ranked = sorted(members, key=lambda m: hashlib.sha256(prefix + m).digest())
        count = len(members) - case["participants"]
        assert sorted(m.hex() for m in ranked[len(members) - count :]) == case["sitting_out"]
        assert int(np.prod(case["sizes"])) == case["participants"]
    for case in vectors["plans"]:
        sizes = case["sizes"]
        if sizes:
            assert int(np.prod(sizes)) == case["n"]
            assert all(case["group_min"] <= m <= case["group_max"] for m in sizes)
            assert sizes == sorted(sizes, reverse=True)
