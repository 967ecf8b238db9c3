"""iptsync: a drop-in replacement for kube-proxy in iptables mode.

The data flow, one module per step: sources -> model -> state -> render -> plan -> apply.
See docs/architecture.md.
"""

__version__ = "0.1.0"
