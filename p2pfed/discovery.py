"""Finding peers on the local network with mDNS / DNS-SD (RFC 6762, RFC 6763), for trio.

Normative text: spec/discovery.md, "mDNS / DNS-SD". In short, every node registers one
service instance of type ``_p2pfed._tcp.local.`` named after its short node id, on its
listen port, with the TXT record ``v=1``, ``fed=<federation tag>``, ``id=<node id>``; it
browses the same type and reports each announcement of its own federation and protocol
version as a :class:`PeerDiscovered` event, and each withdrawn one as :class:`PeerDeparted`.
mDNS is unauthenticated: a discovered address is a candidate until a Noise handshake
proves the node id.

Rules of this file:

* The pure part (:func:`txt_record`, :func:`parse_txt`, :func:`classify_announcement`,
  :func:`choose_host`) decides everything about what an announcement means and is tested
  without a network.
* zeroconf runs its own asyncio loop in a thread, and its synchronous API blocks. Those
  calls (register, browse setup, unregister, close, resolving a service) run in threads
  only: :func:`trio.to_thread.run_sync` from trio, and the browser's own thread for
  resolving. Events cross into trio with ``TrioToken.run_sync_soon`` and land in a
  bounded memory channel; the zeroconf threads never wait for trio.

Example (run under trio)::

    mdns = MdnsDiscovery(node_id, federation.tag, port=7447, addresses=["192.168.1.7"])
    async with mdns as events:
        async for event in events:
            if isinstance(event, PeerDiscovered):
                table.observe(event.node_id, event.host, event.port, "mdns", trio.current_time())
            elif isinstance(event, PeerDeparted):
                table.remove(event.node_id)
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import ifaddr
import trio

if TYPE_CHECKING:  # zeroconf is imported when mDNS starts: simnet and mdns = false never load it
    from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from p2pfed.identity import NODE_ID_TEXT_LENGTH, NodeId, NodeIdError

__all__ = [
    "DEFAULT_RESOLVE_TIMEOUT",
    "SERVICE_TYPE",
    "SUPPORTED_VERSIONS",
    "TXT_KEY_FEDERATION",
    "TXT_KEY_ID",
    "TXT_KEY_VERSION",
    "AnnouncementIgnored",
    "DiscoveryEvent",
    "IgnoreReason",
    "MdnsDiscovery",
    "PeerDeparted",
    "PeerDiscovered",
    "choose_host",
    "classify_announcement",
    "instance_name",
    "local_addresses",
    "parse_txt",
    "txt_record",
]

log = logging.getLogger("p2pfed.discovery")

SERVICE_TYPE: Final = "_p2pfed._tcp.local."
SUPPORTED_VERSIONS: Final = (1, 2)
"""Protocol versions this implementation speaks (announced in the ``v`` TXT key)."""
TXT_KEY_VERSION: Final = "v"
TXT_KEY_FEDERATION: Final = "fed"
TXT_KEY_ID: Final = "id"
DEFAULT_RESOLVE_TIMEOUT = 3.0
"""Seconds the browser thread waits for an announced service's SRV, TXT and address
records before giving up on it (it is retried when the service is announced again)."""
_MAX_LABEL_BYTES = 63
_TAG_RE = re.compile(r"[0-9a-f]{16}")
_VERSIONS_RE = re.compile(r"[1-9][0-9]{0,9}(,[1-9][0-9]{0,9})*")


class IgnoreReason:
    """Why an announcement did not become a :class:`PeerDiscovered` (string constants)."""

    OWN: Final = "own"
    """It is this node's own announcement (same node id)."""
    OTHER_FEDERATION: Final = "other-federation"
    """Its ``fed`` tag is another federation's."""
    UNSUPPORTED_VERSION: Final = "unsupported-version"
    """Its ``v`` lists no protocol version this node speaks."""
    MALFORMED: Final = "malformed"
    """A TXT key is missing or invalid, or the port is 0."""
    NO_ADDRESS: Final = "no-address"
    """It carries no address this node could dial."""
    UNRESOLVED: Final = "unresolved"
    """Its SRV/TXT/address records did not arrive within the resolve timeout."""


@dataclass(frozen=True)
class PeerDiscovered:
    """A node of our federation announced itself (or changed its address) on the LAN.
    Only a candidate: dial it and let the handshake prove ``node_id``."""

    node_id: NodeId
    host: str
    port: int
    instance: str = ""
    """The DNS-SD instance name, e.g. ``"abcdefghij._p2pfed._tcp.local."``."""


@dataclass(frozen=True)
class PeerDeparted:
    """A node withdrew its announcement (mDNS goodbye, or its records expired)."""

    node_id: NodeId
    instance: str = ""


@dataclass(frozen=True)
class AnnouncementIgnored:
    """An announcement seen on the wire and ignored (only reported with
    ``report_ignored=True``; useful to explain why a peer is not found)."""

    instance: str
    reason: str
    detail: str = ""


DiscoveryEvent = PeerDiscovered | PeerDeparted | AnnouncementIgnored


# -- the pure part -------------------------------------------------------------------------


def instance_name(node_id: NodeId) -> str:
    """The DNS-SD instance label of a node: its short id (10 characters, well under the
    63-byte label limit). zeroconf appends ``-2``, ``-3``... if the name is taken."""
    return node_id.short


def txt_record(node_id: NodeId, federation_tag: str) -> dict[str, str]:
    """The TXT key/value pairs a node announces.

    >>> txt = txt_record(NodeId(bytes(32)), "0123456789abcdef")
    >>> txt["v"], txt["fed"], len(txt["id"])
    ('1', '0123456789abcdef', 52)
    """
    if not isinstance(federation_tag, str) or not _TAG_RE.fullmatch(federation_tag):
        raise ValueError(
            f"a federation tag is 16 lowercase hex characters (Federation.tag), "
            f"got {federation_tag!r}"
        )
    return {
        TXT_KEY_VERSION: ",".join(str(v) for v in SUPPORTED_VERSIONS),
        TXT_KEY_FEDERATION: federation_tag,
        TXT_KEY_ID: str(node_id),
    }


def parse_txt(text: bytes) -> dict[str, bytes | None]:
    """Decode DNS-SD TXT record data (RFC 6763 section 6): a sequence of length-prefixed
    strings ``key=value``. Keys are compared case-insensitively (returned in lowercase);
    only the first occurrence of a key counts; a string without ``=`` is a key with no
    value (``None``); empty strings and strings starting with ``=`` are skipped. A length
    prefix running past the end of the data truncates the record there.

    >>> parse_txt(bytes([3]) + b"v=1" + bytes([5]) + b"V=2,x" + bytes([4]) + b"flag")
    {'v': b'1', 'flag': None}
    """
    result: dict[str, bytes | None] = {}
    pos = 0
    while pos < len(text):
        length = text[pos]
        item = text[pos + 1 : pos + 1 + length]
        pos += 1 + length
        if len(item) < length:
            break  # truncated: the last string is incomplete
        raw_key, sep, value = item.partition(b"=")
        if not raw_key:
            continue
        try:
            key = raw_key.decode("ascii").lower()
        except UnicodeDecodeError:
            continue  # RFC 6763: keys are printable US-ASCII; anything else is no key of ours
        if key not in result:
            result[key] = value if sep else None
    return result


def choose_host(addresses: Sequence[str]) -> str | None:
    """The address to dial among those a service announced: the first IPv4 address that
    is not loopback, else the first IPv6 address that is neither loopback nor link-local,
    else the first loopback address; ``None`` if none is usable. Link-local IPv6 addresses
    are skipped (they need a zone to be dialed); unspecified and multicast ones too.

    >>> choose_host(["fe80::1", "127.0.0.1", "fd00::7", "192.168.1.7"])
    '192.168.1.7'
    """
    ranked: list[tuple[int, int, str]] = []
    for index, text in enumerate(addresses):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast or address.is_link_local:
            continue
        # IPv4 first, then routable IPv6, then loopback (only useful on one machine)
        rank = 2 if address.is_loopback else (0 if address.version == 4 else 1)
        ranked.append((rank, index, str(address)))
    return min(ranked)[2] if ranked else None


def classify_announcement(
    instance: str,
    txt: bytes,
    addresses: Sequence[str],
    port: int | None,
    own_id: NodeId,
    federation_tag: str,
) -> PeerDiscovered | AnnouncementIgnored:
    """What a resolved announcement means to this node (spec/discovery.md, "Receiving").

    Checks, in order: the ``v`` key lists a supported version; ``fed`` is our federation
    tag; ``id`` is a node id in canonical text form and not our own; the port is not 0;
    an address is usable (:func:`choose_host`).
    """

    def ignored(reason: str, detail: str = "") -> AnnouncementIgnored:
        return AnnouncementIgnored(instance, reason, detail)

    props = parse_txt(txt)
    version_text = props.get(TXT_KEY_VERSION)
    if version_text is None or not _VERSIONS_RE.fullmatch(version_text.decode("latin-1")):
        return ignored(IgnoreReason.MALFORMED, f"bad or missing v: {version_text!r}")
    versions = {int(v) for v in version_text.decode("ascii").split(",")}
    if not versions.intersection(SUPPORTED_VERSIONS):
        return ignored(IgnoreReason.UNSUPPORTED_VERSION, f"v={version_text.decode('ascii')}")
    tag = props.get(TXT_KEY_FEDERATION)
    if tag is None or not _TAG_RE.fullmatch(tag.decode("latin-1")):
        return ignored(IgnoreReason.MALFORMED, f"bad or missing fed: {tag!r}")
    if tag.decode("ascii") != federation_tag:
        return ignored(IgnoreReason.OTHER_FEDERATION, f"fed={tag.decode('ascii')}")
    id_text = props.get(TXT_KEY_ID)
    node_id = _parse_node_id(id_text)
    if node_id is None:
        return ignored(IgnoreReason.MALFORMED, f"bad or missing id: {id_text!r}")
    if node_id == own_id:
        return ignored(IgnoreReason.OWN)
    if not port:
        return ignored(IgnoreReason.MALFORMED, "port 0")
    host = choose_host(addresses)
    if host is None:
        return ignored(IgnoreReason.NO_ADDRESS, f"addresses {list(addresses)}")
    return PeerDiscovered(node_id, host, port, instance)


def _parse_node_id(value: bytes | None) -> NodeId | None:
    if value is None or len(value) != NODE_ID_TEXT_LENGTH:
        return None
    text = value.decode("latin-1")
    try:
        node_id = NodeId.parse(text)
    except NodeIdError:
        return None
    return node_id if str(node_id) == text else None  # canonical (lowercase) form only


def local_addresses(interfaces: Sequence[str] | None = None) -> list[str]:
    """The addresses to announce: ``interfaces`` themselves if given (they are interface
    addresses, as in ``mdns_interfaces``), else every IPv4 and non-link-local IPv6 address
    of this machine's interfaces except loopback, or loopback if there is nothing else."""
    if interfaces:
        return [str(ipaddress.ip_address(a)) for a in interfaces]
    found: list[str] = []
    loopback: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if address.is_link_local or address.is_multicast or address.is_unspecified:
                continue
            (loopback if address.is_loopback else found).append(str(address))
    return found or loopback


# -- the zeroconf driver -------------------------------------------------------------------


class MdnsDiscovery:
    """Announce this node and report the nodes of its federation on the local network.

    ``port`` is the node's listen port; ``addresses`` the IP addresses to announce (empty:
    :func:`local_addresses`); ``interfaces`` the IP addresses of the interfaces mDNS uses
    (``None`` or empty: all). Use as an async context manager yielding a receive channel of
    :class:`DiscoveryEvent`, or run :meth:`run` in a nursery. Entering registers the
    service (mDNS probing takes about 2 seconds) and starts browsing; leaving sends goodbye
    packets (about 3 seconds, shielded from cancellation) so peers notice the departure.

    If the consumer falls more than ``buffer_size`` events behind, new events are dropped
    with a warning rather than blocking zeroconf; the peer table's expiry covers a lost
    departure, and the next announcement a lost discovery.
    """

    def __init__(
        self,
        own_id: NodeId,
        federation_tag: str,
        port: int,
        addresses: Sequence[str] = (),
        interfaces: Sequence[str] | None = None,
        *,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        buffer_size: int = 256,
        report_ignored: bool = False,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"the announced port must be the listen port (1..65535), got {port}")
        self.own_id = own_id
        self.federation_tag = federation_tag
        self.txt = txt_record(own_id, federation_tag)  # validates the tag
        self.port = port
        self.interfaces = list(interfaces) if interfaces else None
        for entry in self.interfaces or ():
            ipaddress.ip_address(entry)  # ValueError names a bad interface address
        self.addresses = list(addresses) or local_addresses(self.interfaces)
        for entry in self.addresses:
            ipaddress.ip_address(entry)
        self.resolve_timeout = resolve_timeout
        self.buffer_size = buffer_size
        self.report_ignored = report_ignored
        self.dropped_events = 0
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._send: trio.MemorySendChannel[DiscoveryEvent] | None = None
        # instance name -> node id of every peer reported discovered; touched only by the
        # browser thread (the one thread calling _on_change)
        self._known: dict[str, NodeId] = {}
        self._lock = threading.Lock()

    @property
    def instance(self) -> str | None:
        """The registered instance name (with any ``-N`` suffix zeroconf added), or None."""
        return self._info.name if self._info is not None else None

    async def __aenter__(self) -> trio.MemoryReceiveChannel[DiscoveryEvent]:
        if self._zc is not None:
            raise RuntimeError("this MdnsDiscovery is already running")
        self._token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[DiscoveryEvent](self.buffer_size)
        self._send = send
        try:
            await trio.to_thread.run_sync(self._start)
        except BaseException:
            send.close()
            receive.close()
            self._send = None
            with trio.CancelScope(shield=True):  # undo a registration that completed
                await trio.to_thread.run_sync(self._stop)
            raise
        return receive

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._send is not None:
            self._send.close()  # events still in flight are dropped from here on
            self._send = None
        with trio.CancelScope(shield=True):  # goodbyes matter most on shutdown
            await trio.to_thread.run_sync(self._stop)

    async def run(
        self,
        send_channel: trio.MemorySendChannel[DiscoveryEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Announce and browse until cancelled, forwarding events to ``send_channel``
        (closed on return). ``await nursery.start(discovery.run, send)`` returns once the
        service is registered."""
        async with send_channel, self as events:
            task_status.started()
            async for event in events:
                await send_channel.send(event)

    # -- in threads ----------------------------------------------------------------------

    def _start(self) -> None:
        """Create the zeroconf instance, register, browse (blocking: runs in a thread)."""
        from zeroconf import InterfaceChoice, ServiceBrowser, ServiceInfo, Zeroconf

        interfaces: Any = self.interfaces if self.interfaces else InterfaceChoice.All
        zc = Zeroconf(interfaces=interfaces)
        try:
            label = instance_name(self.own_id)
            assert len(label.encode("utf-8")) <= _MAX_LABEL_BYTES
            info = ServiceInfo(
                SERVICE_TYPE,
                f"{label}.{SERVICE_TYPE}",
                port=self.port,
                properties=self.txt,
                server=f"p2pfed-{label}.local.",
                parsed_addresses=self.addresses,
            )
            zc.register_service(info, allow_name_change=True)
            self._info = info
            self._browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
        except BaseException:
            zc.close()
            raise
        self._zc = zc
        log.info(
            "mDNS: announcing %s on port %d at %s", info.name, self.port, ", ".join(self.addresses)
        )

    def _stop(self) -> None:
        """Stop browsing, send goodbyes, close (blocking: runs in a thread)."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            if self._browser is not None:
                self._browser.cancel()
            if self._info is not None:
                zc.unregister_service(self._info)
        finally:
            zc.close()
            self._browser = None

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """ServiceBrowser handler, in the browser thread: resolve and classify."""
        try:
            with self._lock:
                self._handle_change(zeroconf, service_type, name, state_change)
        except Exception:  # a bug here must not kill zeroconf's browser thread
            log.exception("mDNS: error handling %s %s", state_change, name)

    def _handle_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            gone = self._known.pop(name, None)
            if gone is not None:
                self._emit(PeerDeparted(gone, name))
            return
        info = zeroconf.get_service_info(
            service_type, name, timeout=int(self.resolve_timeout * 1000)
        )
        if info is None:
            event: PeerDiscovered | AnnouncementIgnored = AnnouncementIgnored(
                name, IgnoreReason.UNRESOLVED
            )
        else:
            event = classify_announcement(
                name,
                info.text or b"",
                info.parsed_addresses(),
                info.port,
                self.own_id,
                self.federation_tag,
            )
        previous = self._known.get(name)
        if isinstance(event, PeerDiscovered):
            if previous is not None and previous != event.node_id:
                self._emit(PeerDeparted(previous, name))
            self._known[name] = event.node_id
            self._emit(event)
            return
        if previous is not None and event.reason != IgnoreReason.UNRESOLVED:
            # a peer we reported now announces something we ignore: it has left us
            del self._known[name]
            self._emit(PeerDeparted(previous, name))
        if self.report_ignored:
            self._emit(event)
        if event.reason != IgnoreReason.OWN:
            log.debug("mDNS: ignoring %s: %s %s", name, event.reason, event.detail)

    def _emit(self, event: DiscoveryEvent) -> None:
        """Hand ``event`` to the trio thread without waiting for it."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):  # trio stopped: nobody listens
            token.run_sync_soon(self._deliver, event)

    def _deliver(self, event: DiscoveryEvent) -> None:
        """Runs in the trio thread: queue ``event`` unless closed or full."""
        send = self._send
        if send is None:
            return
        try:
            send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped_events += 1
            log.warning("mDNS: consumer is %d events behind; dropped %r", self.buffer_size, event)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
