"""simnet: a deterministic network simulator that runs the real p2pfed node code.

Many :class:`p2pfed.node.Node` objects run in one trio process on a
:class:`simnet.network.VirtualNetwork` in virtual time (``trio.testing.MockClock``):
latency, bandwidth, loss, partitions, crashes, churn and LAN-local mDNS, with topologies
from :mod:`simnet.topology` and scenarios from TOML files (:mod:`simnet.scenario`).
:func:`simnet.simulation.run_simulation` runs one; ``p2pfed simnet run`` is the command
line (:mod:`simnet.cli`). See simnet/README.md.
"""
