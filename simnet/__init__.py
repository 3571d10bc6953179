"""simnet: a deterministic network simulator that runs the real p2pfed node code.

The simulator arrives with its own issue; this package exists so that the layout is fixed
from the start and node code is written against a network interface it can replace.
"""
