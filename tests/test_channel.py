"""The sans-IO channel core, driven back to back in memory (no sockets)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfed.channel import (
    MAX_TRANSPORT_PLAINTEXT,
    TRANSITIONS,
    ChannelConnection,
    ConnectionClosed,
    HandshakeComplete,
    MessageReceived,
    Role,
    State,
    StaticKey,
)
from p2pfed.errors import (
    CloseCode,
    DecodeError,
    HandshakeError,
    LocalProtocolError,
    MessageTooLargeError,
    RemoteProtocolError,
)
from p2pfed.federation import Federation
from p2pfed.identity import NodeIdentity
from p2pfed.messages import Close, ModelState, decode_message

FED = Federation.new("test-fed")


def pair(
    fed_a: Federation = FED,
    fed_b: Federation = FED,
    *,
    max_a: int = 1 << 24,
    max_b: int = 1 << 24,
    versions_a: tuple[int, ...] = (1,),
    versions_b: tuple[int, ...] = (1,),
) -> tuple[ChannelConnection, ChannelConnection]:
    a = ChannelConnection(
        Role.INITIATOR,
        identity=NodeIdentity.generate(),
        federation_id=fed_a.federation_id,
        psk=fed_a.secret,
        max_message_size=max_a,
        versions=versions_a,
    )
    b = ChannelConnection(
        Role.RESPONDER,
        identity=NodeIdentity.generate(),
        federation_id=fed_b.federation_id,
        psk=fed_b.secret,
        max_message_size=max_b,
        versions=versions_b,
    )
    a.start()
    b.start()
    return a, b


def handshake(a: ChannelConnection, b: ChannelConnection) -> tuple[list, list]:
    """Shuttle bytes until both sides are open; return every event each side saw."""
    events_a: list = []
    events_b: list = []
    for _ in range(4):
        events_b += b.receive_data(a.data_to_send())
        events_a += a.receive_data(b.data_to_send())
    return events_a, events_b


def model(size: int, round_: int = 7) -> ModelState:
    return ModelState(round=round_, fingerprint=bytes(range(32)), parameters=os.urandom(size))


def test_handshake_opens_both_sides_with_peer_identities() -> None:
    a, b = pair()
    events_a, events_b = handshake(a, b)
    assert a.is_open and b.is_open
    [done_a] = events_a
    [done_b] = events_b
    assert isinstance(done_a, HandshakeComplete) and isinstance(done_b, HandshakeComplete)
    assert done_a.peer_id == b._identity.node_id
    assert done_b.peer_id == a._identity.node_id
    assert done_a.version == done_b.version == 1
    assert a.handshake_hash == b.handshake_hash


def test_messages_of_every_size_cross_in_both_directions() -> None:
    a, b = pair()
    handshake(a, b)
    # sizes around the Noise message boundary and a multi-megabyte one
    for size in (0, 1, MAX_TRANSPORT_PLAINTEXT - 60, MAX_TRANSPORT_PLAINTEXT, 3_000_000):
        sent = model(size - size % 4)
        a.send_message(sent)
        wire = a.data_to_send()
        events = []
        # deliver in awkward pieces: the core must reassemble across any split
        for start in range(0, len(wire), 7919):
            events += b.receive_data(wire[start : start + 7919])
        assert events == [MessageReceived(sent)]
        b.send_message(sent)
        assert a.receive_data(b.data_to_send()) == [MessageReceived(sent)]


def test_batches_stream_a_big_message_in_bounded_pieces() -> None:
    a, b = pair()
    handshake(a, b)
    sent = model(4_000_000)
    batches = [bytes(batch) for batch in a.send_message_batches(sent, batch_size=1 << 20)]
    assert len(batches) >= 4
    assert all(len(batch) < (1 << 20) + 70_000 for batch in batches)
    events = []
    for batch in batches:
        events += b.receive_data(batch)
    assert events == [MessageReceived(sent)]


def test_messages_sent_together_share_noise_messages() -> None:
    a, b = pair()
    handshake(a, b)
    small = [model(16, round_=i) for i in range(5)]
    big = model(200_000, round_=99)
    wire = b"".join(bytes(x) for x in a.send_messages_batches([*small, big, small[0]]))
    # five small frames and the start of the big one fill the first Noise message, whose
    # 2-byte length prefix says so: packing, not one Noise message per frame
    assert int.from_bytes(wire[:2], "big") == MAX_TRANSPORT_PLAINTEXT + 16
    noise_messages = 0
    position = 0
    while position < len(wire):
        position += 2 + int.from_bytes(wire[position : position + 2], "big")
        noise_messages += 1
    total = sum(4 + len(m.encode()) for m in [*small, big, small[0]])
    assert noise_messages == -(-total // MAX_TRANSPORT_PLAINTEXT)
    assert b.receive_data(wire) == [MessageReceived(m) for m in [*small, big, small[0]]]


def test_one_message_batch_is_the_single_message_wire_form() -> None:
    a1, b1 = pair()
    handshake(a1, b1)
    sent = model(100_000)
    single = b"".join(bytes(x) for x in a1.send_message_batches(sent))
    assert b1.receive_data(single) == [MessageReceived(sent)]
    # the same connection state encrypting [sent] gives the layout send_message gives
    a2, b2 = pair()
    handshake(a2, b2)
    listed = b"".join(bytes(x) for x in a2.send_messages_batches([sent]))
    assert len(listed) == len(single)
    assert b2.receive_data(listed) == [MessageReceived(sent)]


def test_a_static_key_is_reused_with_its_signature() -> None:
    alice = NodeIdentity.generate()
    static = StaticKey.generate(alice)
    for _ in range(2):
        a = ChannelConnection(
            Role.INITIATOR,
            identity=alice,
            federation_id=FED.federation_id,
            psk=FED.secret,
            noise_static=static,
        )
        b = ChannelConnection(
            Role.RESPONDER,
            identity=NodeIdentity.generate(),
            federation_id=FED.federation_id,
            psk=FED.secret,
        )
        a.start()
        b.start()
        _, events_b = handshake(a, b)
        [done] = events_b
        assert isinstance(done, HandshakeComplete) and done.peer_id == alice.node_id


def test_wrong_psk_fails_at_message_3() -> None:
    other = Federation(name=FED.name, federation_id=FED.federation_id, secret=os.urandom(32))
    a, b = pair(FED, other)
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    with pytest.raises(HandshakeError, match="federation"):
        b.receive_data(a.data_to_send())
    assert b.state is State.CLOSED
    assert not a.is_open


def test_other_federation_id_fails_even_with_same_secret() -> None:
    other = Federation(name=FED.name, federation_id=os.urandom(16), secret=FED.secret)
    a, b = pair(FED, other)
    # the prologue differs, and with a PSK modifier even message 1's (empty) payload is
    # authenticated over the handshake hash, which covers the prologue
    with pytest.raises(HandshakeError, match="message 1"):
        b.receive_data(a.data_to_send())


def test_no_common_version_closes_with_unsupported_version() -> None:
    a, b = pair(versions_a=(2, 3), versions_b=(1,))
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    with pytest.raises(RemoteProtocolError) as info:
        b.receive_data(a.data_to_send())
    assert info.value.code is CloseCode.UNSUPPORTED_VERSION
    [closed] = a.receive_data(b.data_to_send())
    assert isinstance(closed, ConnectionClosed)
    assert closed.close_code is CloseCode.UNSUPPORTED_VERSION
    assert a.state is State.CLOSED


def test_highest_common_version_is_chosen() -> None:
    a, b = pair(versions_a=(1, 2, 5), versions_b=(1, 2, 3))
    events_a, events_b = handshake(a, b)
    assert events_a[0].version == events_b[0].version == 2


def test_bad_identity_signature_is_rejected() -> None:
    a, b = pair()

    real = a._own_payload

    def corrupt(handshake):  # type: ignore[no-untyped-def]
        from p2pfed.messages import HandshakePayload

        good = HandshakePayload.decode(real(handshake))
        bad_sig = bytes([good.signature[0] ^ 1]) + good.signature[1:]
        return HandshakePayload(
            identity_key=good.identity_key,
            signature=bad_sig,
            versions=good.versions,
            max_message_size=good.max_message_size,
        ).encode()

    a._own_payload = corrupt  # type: ignore[method-assign]
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    with pytest.raises(HandshakeError, match="signature"):
        b.receive_data(a.data_to_send())


def test_oversize_frame_is_refused_before_reassembly() -> None:
    a, b = pair(max_b=1024)
    handshake(a, b)
    with pytest.raises(LocalProtocolError, match="peer accepts at most 1024"):
        a.send_message(model(4000))
    a.peer_max_message_size = 1 << 30  # play a peer that ignores the announced limit
    a.send_message(model(400_000))
    wire = a.data_to_send()
    with pytest.raises(MessageTooLargeError):
        b.receive_data(wire[: 2 + 65535])  # the first Noise message (with the header) suffices
    # b queued a Close telling a why
    [closed] = a.receive_data(b.data_to_send())
    assert closed.close_code is CloseCode.MESSAGE_TOO_LARGE


def test_invalid_cbor_is_a_decode_error_and_sends_close() -> None:
    a, b = pair()
    handshake(a, b)
    a._queue_frame(b"\xff\x00garbage")
    with pytest.raises(DecodeError):
        b.receive_data(a.data_to_send())
    [closed] = a.receive_data(b.data_to_send())
    assert closed.close_code is CloseCode.MALFORMED_MESSAGE


def test_tampered_transport_message_fails_authentication() -> None:
    a, b = pair()
    handshake(a, b)
    a.send_message(model(100))
    wire = bytearray(a.data_to_send())
    wire[10] ^= 0x01
    with pytest.raises(RemoteProtocolError, match="authentication"):
        b.receive_data(bytes(wire))


def test_orderly_close_reaches_the_peer() -> None:
    a, b = pair()
    handshake(a, b)
    a.close(CloseCode.SHUTTING_DOWN, "bye")
    [closed] = b.receive_data(a.data_to_send())
    assert closed == ConnectionClosed(code=int(CloseCode.SHUTTING_DOWN), reason="bye")
    assert a.state is State.CLOSED and b.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        a.send_message(model(4))


def test_welcome_after_open_is_an_unexpected_message() -> None:
    from p2pfed.messages import Welcome

    a, b = pair()
    handshake(a, b)
    b._queue_message(Welcome(version=1, max_message_size=10))
    with pytest.raises(RemoteProtocolError) as info:
        a.receive_data(b.data_to_send())
    assert info.value.code is CloseCode.UNEXPECTED_MESSAGE


def test_garbage_instead_of_handshake() -> None:
    _, b = pair()
    with pytest.raises(HandshakeError):
        b.receive_data(b"\x00\x20" + b"\x01" * 32)  # a well-framed but wrong message 1
    _, c = pair()
    with pytest.raises(HandshakeError, match="longer than"):
        c.receive_data(b"GET / HTTP/1.1\r\n\r\n")  # 'GE' = 18245-byte length


def test_close_message_reason_is_truncated_to_the_limit() -> None:
    a, b = pair()
    handshake(a, b)
    a.close(CloseCode.NORMAL, "x" * 1000)
    [closed] = b.receive_data(a.data_to_send())
    assert len(closed.reason) == 256


def test_transition_table_covers_every_state_for_both_roles() -> None:
    for role in Role:
        for state, moves in TRANSITIONS[role].items():
            for target in moves.values():
                assert target in TRANSITIONS[role], f"{role} {state} -> {target} is a dead end"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.integers(min_value=0, max_value=3))
def test_fuzz_random_bytes_only_raise_protocol_errors(data: bytes, phase: int) -> None:
    """Whatever a peer sends, the core answers with events or a RemoteProtocolError."""
    a, b = pair()
    target = b
    if phase >= 1:
        handshake(a, b)
        target = b if phase == 1 else a
    try:
        target.receive_data(data)
    except RemoteProtocolError:
        assert target.state is State.CLOSED


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_fuzz_mutated_transport_only_raise_protocol_errors(data: st.DataObject) -> None:
    a, b = pair()
    handshake(a, b)
    a.send_message(model(4 * data.draw(st.integers(0, 50_000))))
    wire = bytearray(a.data_to_send())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(wire) - 1))
        wire[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        events = b.receive_data(bytes(wire[:cut]))
    except RemoteProtocolError:
        return
    # only possible if the mutations fell beyond the cut
    for event in events:
        assert isinstance(event, MessageReceived)


def test_close_frame_decodes_with_the_shared_decoder() -> None:
    a, b = pair()
    handshake(a, b)
    a.close(CloseCode.IDLE_TIMEOUT, "quiet")
    wire = a.data_to_send()
    plaintext = b._transport.receive.decrypt_with_ad(b"", wire[2:])  # type: ignore[union-attr]
    assert decode_message(plaintext[4:]) == Close(code=6, reason="quiet")


def test_a_peer_announcing_a_message_limit_below_the_minimum_fails_the_handshake() -> None:
    """Found while fuzzing: a peer announcing max_message_size 0 was accepted, and every
    later send to it failed locally (spec/transport.md, section 3: at least 1024)."""
    a, b = pair()
    a.max_message_size = 0  # a peer that announces 0 in handshake message 3
    with pytest.raises(HandshakeError, match="below the protocol's minimum 1024"):
        handshake(a, b)
    with pytest.raises(LocalProtocolError, match="between 1024"):
        pair(max_a=1000)
