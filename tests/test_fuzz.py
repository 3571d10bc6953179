"""The fuzzing harnesses of fuzz/ (issue #15): every corpus input replayed through its
harness, the seed corpora in step with the spec's vectors, and a short coverage-guided
run of every harness under atheris (the long runs and their results: fuzz/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# fuzz/ is a directory of the repository, not an installed package: `python -m pytest`
# finds it from the working directory, a bare `pytest` does not.
sys.path.insert(0, str(ROOT))

from fuzz import group_protocol as fuzz_group  # noqa: E402
from fuzz import make_corpus  # noqa: E402
from fuzz._support import Reader, corpus_files  # noqa: E402
from p2pfed.group import GroupAborted, Phase, Send  # noqa: E402
from p2pfed.identity import NodeId  # noqa: E402
from p2pfed.messages import (  # noqa: E402
    MAX_REASON_BYTES,
    GroupAbort,
    GroupStart,
    decode_message,
    encode_message,
)

TARGETS = sorted(make_corpus.TARGETS)

# (atheris runs, cap in seconds): the whole short run stays under a minute on a busy
# machine; the group harness runs four protocol cores per input, so it gets fewer
SHORT_RUNS = {
    "cbor_decode": (4000, 5),
    "message_decode": (4000, 5),
    "handshake": (2000, 5),
    "channel_frames": (600, 6),
    "group_protocol": (150, 8),
}


def test_every_target_has_a_seed_corpus_and_a_short_run() -> None:
    assert set(SHORT_RUNS) == set(TARGETS)
    for target in TARGETS:
        assert len(corpus_files(target)) >= 10, f"run python -m fuzz.make_corpus ({target})"


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_without_a_failure(target: str) -> None:
    """Every stored input, seeds and past crashes alike, passes its harness's contract."""
    test_one_input = make_corpus.TARGETS[target][0]
    files = corpus_files(target)
    try:
        for path in files:
            try:
                test_one_input(path.read_bytes())
            except BaseException as exc:
                raise AssertionError(f"{path.relative_to(ROOT)} fails its harness") from exc
    finally:
        # cbor_decode leaves tracemalloc on (for speed under atheris); the rest of a test
        # session should not pay for tracing
        if tracemalloc.is_tracing():
            tracemalloc.stop()


@pytest.mark.parametrize("target", ["cbor_decode", "message_decode", "handshake"])
def test_seed_corpus_matches_the_spec_vectors(target: str) -> None:
    """The stored seeds are what make_corpus generates from spec/vectors today (if the
    vectors changed, run ``python -m fuzz.make_corpus``)."""
    stored = {p.read_bytes() for p in corpus_files(target) if p.name.startswith("seed-")}
    assert set(make_corpus.seeds(target)) == stored


def test_group_seeds_reach_completion_and_aborts() -> None:
    """The group corpus drives the protocol deep: groups complete, and injected messages
    make some abort (a corpus of shallow programs would fuzz only the formation code)."""
    from fuzz import group_protocol

    completed = aborted = injected = 0
    for path in corpus_files("group_protocol"):
        group_protocol.test_one_input(path.read_bytes())
        completed += group_protocol.last_run["completed"]
        aborted += group_protocol.last_run["aborted"]
        injected += group_protocol.last_run["injected"]
    assert completed and aborted and injected


def test_handshake_vector_seeds_complete_a_handshake() -> None:
    """The raw-bytes modes start from a genuine transcript (the spec's transport vector,
    whose keys the harness's nodes hold), so mutations begin deep in the handshake."""
    from fuzz import handshake
    from p2pfed.channel import Role

    for role, name in ((Role.RESPONDER, "to-responder"), (Role.INITIATOR, "to-initiator")):
        [path] = [p for p in corpus_files("handshake") if f"vector-{name}" in p.name]
        reader = Reader(path.read_bytes()[1:])
        victim = handshake.Victim(role)
        victim.conn.data_to_send()
        victim.feed(reader.rest(), reader)
        assert victim.failed is None and victim.conn.handshake_hash is not None


@pytest.mark.parametrize("target", TARGETS)
def test_short_atheris_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    runs, seconds = SHORT_RUNS[target]
    scratch = tmp_path / "new"
    scratch.mkdir()
    command = [
        sys.executable,
        "-m",
        f"fuzz.{target}",
        f"-atheris_runs={runs}",
        f"-max_total_time={seconds}",
        "-rss_limit_mb=1536",
        "-timeout=60",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        str(scratch),
        str(ROOT / "fuzz" / "corpus" / target),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    crashes = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert result.returncode == 0 and not crashes, f"{crashes}\n{output[-6000:]}"
    assert "Done" in output or "stat::number_of_executed_units" in output, output[-3000:]


# -- regressions: bugs found with the harnesses, each fixed in the code under test -----


def _running_with_mallory() -> tuple[fuzz_group.Net, NodeId, bytes]:
    """The group harness's four nodes, stepped until an honest node runs an all-reduce
    with mallory as a member: (the net, that node's id, the group id)."""
    net = fuzz_group.Net(Reader(bytes([0, 1, 1, 1, 1, 1])))
    mallory_key = fuzz_group.IDENTITIES[3].public_key
    for _ in range(400):
        if net.queue:
            net.deliver(0)
        else:
            net.now += 0.1
            net.poll()
        for node_id in fuzz_group.HONEST:
            if net.nodes[node_id].phase is Phase.RUNNING:
                starts = [
                    m
                    for m in map(decode_message, net.wire)
                    if isinstance(m, GroupStart)
                    and mallory_key in {member.identity_key for member in m.members}
                ]
                return net, node_id, starts[-1].group_id
    raise AssertionError("no all-reduce with mallory started")


def test_peer_abort_reason_of_multibyte_characters_does_not_crash_a_member() -> None:
    """Found while writing fuzz.group_protocol (its field rewrite makes such aborts):
    a member that aborts with a reason of 256 bytes of two-byte characters made the
    others fail building their own GroupAbort (the echoed reason was cut to 256
    *characters*, over the 256-*byte* limit), so the protocol core raised
    LocalProtocolError into the node. (corpus/group_protocol/crash-multibyte-abort-reason
    reproduces it through the harness.)"""
    net, node_id, group_id = _running_with_mallory()
    abort = GroupAbort(group_id=group_id, reason="é" * (MAX_REASON_BYTES // 2))
    actions = net.nodes[node_id].receive(fuzz_group.MALLORY, abort, net.now)
    sent = [a.message for a in actions if isinstance(a, Send)]
    assert sent
    for message in sent:
        assert isinstance(message, GroupAbort)
        assert len(message.reason.encode("utf-8")) <= MAX_REASON_BYTES
        encode_message(message)
    assert any(isinstance(a, GroupAborted) for a in actions)


def test_refusing_a_start_that_lists_many_excluded_nodes_does_not_crash() -> None:
    """Same bug class, found while writing the group harness's exclusion model: a
    GroupStart refused because it lists excluded nodes names them all in the GroupAbort
    reason, over 256 bytes once some twenty are listed."""
    import numpy as np

    from fuzz import group_protocol as g
    from p2pfed.group import GroupProtocol, Send
    from p2pfed.identity import NodeIdentity
    from p2pfed.messages import (
        MAX_REASON_BYTES,
        GroupAbort,
        GroupInvite,
        GroupMemberInfo,
        GroupStart,
        encode_message,
    )

    me, initiator = g.IDENTITIES[0], g.IDENTITIES[1]
    node = GroupProtocol(
        me,
        g.CONFIG,
        g.PARAMS,
        fingerprint=g.FINGERPRINT,
        model_size=g.D,
        listen_port=7000,
        excluded=lambda peer, now: peer != initiator.node_id,
        randbytes=lambda n: bytes(n),
    )
    node.register_peer(initiator.node_id, initiator.public_key)
    node.set_contribution(np.zeros(g.D, np.float32), 1, 1, 0.0)
    group_id = bytes(range(16))
    invite = GroupInvite(
        group_id=group_id, priority=1, round=1, fingerprint=g.FINGERPRINT, model_size=g.D
    )
    [reply] = node.receive(initiator.node_id, invite, 0.0)
    assert isinstance(reply, Send) and reply.message.accept  # type: ignore[attr-defined]
    others = [NodeIdentity.from_private_bytes(bytes([100 + i]) * 32) for i in range(30)]
    members = [
        GroupMemberInfo(
            identity_key=m.public_key, mask_key=bytes(32), key_signature=bytes(64), host="", port=1
        )
        for m in [me, initiator, *others]
    ]
    start = GroupStart(group_id=group_id, round=1, nonce=bytes(32), members=members)
    names = ", ".join(m.node_id.short for m in others)
    assert len(f"the group lists excluded nodes: {names}".encode()) > MAX_REASON_BYTES
    actions = node.receive(initiator.node_id, start, 0.1)
    aborts = [a.message for a in actions if isinstance(a, Send)]
    assert len(aborts) == 31 and all(isinstance(m, GroupAbort) for m in aborts)
    for message in aborts:
        encode_message(message)
