"""The one network interface node code uses: listen, connect, own address, discovery.

Node code never imports ``socket`` or zeroconf directly; it is handed a :class:`Network`.
:class:`TcpNetwork` is the real one (TCP and mDNS). simnet provides another that runs the
same node over a virtual network in virtual time, which is why this interface is small
and speaks only trio streams and memory channels.

Example::

    network = TcpNetwork(mdns=False)
    listener = await network.listen("127.0.0.1", 0)
    port = network.listen_port(listener)
    stream = await network.connect("127.0.0.1", port)
"""

from __future__ import annotations

import abc
import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from p2pfed.discovery import DiscoveryEvent, MdnsDiscovery, PeerDeparted, PeerDiscovered
from p2pfed.errors import ListenError
from p2pfed.identity import NodeId

__all__ = [
    "DiscoveryEvent",
    "Network",
    "PeerDeparted",
    "PeerDiscovered",
    "TcpNetwork",
]


class Network(abc.ABC):
    """What a node needs from the world to talk to other nodes."""

    @abc.abstractmethod
    async def listen(self, host: str, port: int) -> trio.abc.Listener[trio.abc.Stream]:
        """Start accepting connections on ``host:port`` (port 0: any free port)."""

    @abc.abstractmethod
    def listen_port(self, listener: trio.abc.Listener[trio.abc.Stream]) -> int:
        """The port a listener from :meth:`listen` actually accepts on."""

    @abc.abstractmethod
    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """Open a connection; raises ``OSError`` if the peer cannot be reached.

        ``OSError`` (or a subclass, such as ``TimeoutError``) is the only exception a
        failed attempt may raise, whatever the cause: refused, unreachable, a name that
        does not resolve, or no answer within the network's connect timeout. The node
        treats it as a failed attempt and retries later; anything else would end the node.
        """

    @abc.abstractmethod
    def peer_host(self, stream: trio.abc.Stream) -> str | None:
        """The remote address of a stream, if the network knows it."""

    @abc.abstractmethod
    def discover(self, own_id: NodeId, federation_tag: str, port: int) -> AbstractDiscovery:
        """Announce this node and find others on the local segment."""


class AbstractDiscovery(abc.ABC):
    """A running announcement plus browser: ``async with`` yields a stream of events."""

    @abc.abstractmethod
    def events(self) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[DiscoveryEvent]]:
        """Async context manager: announce while open, yield the event channel."""


class _NoDiscovery(AbstractDiscovery):
    @asynccontextmanager
    async def events(self) -> AsyncIterator[trio.abc.ReceiveChannel[DiscoveryEvent]]:
        send, receive = trio.open_memory_channel[DiscoveryEvent](0)
        async with send, receive:
            yield receive


class TcpNetwork(Network):
    """Real TCP connections, and mDNS/DNS-SD discovery through zeroconf.

    ``mdns_interfaces`` are the addresses zeroconf binds to (empty: all interfaces);
    ``advertise`` are the addresses announced (empty: those zeroconf finds).
    """

    def __init__(
        self,
        *,
        mdns: bool = True,
        mdns_interfaces: tuple[str, ...] = (),
        advertise: tuple[str, ...] = (),
        connect_timeout: float = 5.0,
    ) -> None:
        self.mdns = mdns
        self.mdns_interfaces = mdns_interfaces
        self.advertise = advertise
        self.connect_timeout = connect_timeout

    async def listen(self, host: str, port: int) -> trio.abc.Listener[trio.abc.Stream]:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except (OSError, UnicodeError) as exc:
            raise listen_error(
                "the node", host, port, exc, "--listen HOST:PORT or listen_port in config.toml"
            ) from exc
        return listeners[0]

    def listen_port(self, listener: trio.abc.Listener[trio.abc.Stream]) -> int:
        assert isinstance(listener, trio.SocketListener)
        return int(listener.socket.getsockname()[1])

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # fail_after raises TooSlowError when its block exits, so the except clause must
        # be outside the with block: inside it, it would never see the timeout
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise OSError(
                errno.ETIMEDOUT,
                f"no answer from {where} within {self.connect_timeout:g} s (is the host up, "
                "and does a firewall let TCP through to that port?)",
            ) from None
        except UnicodeError as exc:
            # a host name that cannot be IDNA-encoded (a label over 63 characters, say)
            raise OSError(errno.EINVAL, f"{host!r} is not a valid host name: {exc}") from exc
        except socket.gaierror as exc:
            raise OSError(exc.errno, f"cannot resolve {host!r}: {exc.strerror}") from exc
        except OSError as exc:
            raise _connect_error(where, exc) from exc
        try:
            # models are sent as large batches: small-message latency matters more than
            # Nagle's coalescing for the group protocol's control messages
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    def peer_host(self, stream: trio.abc.Stream) -> str | None:
        if isinstance(stream, trio.SocketStream):
            try:
                return str(stream.socket.getpeername()[0])
            except OSError:
                return None
        return None

    def discover(self, own_id: NodeId, federation_tag: str, port: int) -> AbstractDiscovery:
        if not self.mdns:
            return _NoDiscovery()
        return _MdnsAdapter(
            MdnsDiscovery(
                own_id,
                federation_tag,
                port,
                addresses=list(self.advertise),
                interfaces=list(self.mdns_interfaces) or None,
            )
        )


def listen_error(who: str, host: str, port: int, error: BaseException, setting: str) -> ListenError:
    """A fatal, one-line explanation of why ``who`` cannot listen on ``host:port``;
    ``setting`` names where the user can choose another address."""
    where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
    number = error.errno if isinstance(error, OSError) else None
    if number == errno.EADDRINUSE:
        advice = f"another process uses that port: stop it, or choose another port with {setting}"
        reason = "the port is in use"
    elif number == errno.EADDRNOTAVAIL:
        advice = f"use an address of this host, or 0.0.0.0, with {setting}"
        reason = "that address is not one of this host's"
    elif number in (errno.EACCES, errno.EPERM):
        advice = f"ports below 1024 need privileges: choose a port from 1024 up with {setting}"
        reason = "permission denied"
    elif isinstance(error, socket.gaierror | UnicodeError):
        advice = f"give an IP address or a name that resolves, with {setting}"
        reason = f"cannot resolve {host!r}"
    else:
        advice = f"check the address given with {setting}"
        reason = str(error)
    return ListenError(f"{who} cannot listen on {where}: {reason} ({advice})")


def _connect_error(where: str, error: OSError) -> OSError:
    """One readable OSError for a failed ``open_tcp_stream``.

    trio raises a bare "all attempts to connect to HOST:PORT failed" and keeps the reasons
    (one per address tried) in an exception group as its cause; the node logs the message
    only, so the reasons ("Connection refused") go into it.
    """
    cause = error.__cause__
    reasons = (
        [e for e in cause.exceptions if isinstance(e, OSError)]
        if isinstance(cause, BaseExceptionGroup)
        else []
    )
    if not reasons:
        return error
    # (trio's own strerror repeats the address: "Error connecting to ('::1', 1, 0, 0): ...")
    texts = list(dict.fromkeys(os.strerror(r.errno) if r.errno else str(r) for r in reasons))
    return OSError(reasons[0].errno, f"cannot connect to {where}: {'; '.join(texts)}")


class _MdnsAdapter(AbstractDiscovery):
    def __init__(self, mdns: MdnsDiscovery) -> None:
        self._mdns = mdns

    @asynccontextmanager
    async def events(self) -> AsyncIterator[trio.abc.ReceiveChannel[DiscoveryEvent]]:
        async with self._mdns as channel:
            yield channel
