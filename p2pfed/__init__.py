"""p2pfed: serverless federated learning with secure aggregation and differential privacy.

Nodes find each other, train on their own data and average their models in small groups
whose members only ever see a masked, noised sum. See README.md for the commands and
spec/ for the wire protocol.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
