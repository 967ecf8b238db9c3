"""The node's kernel: the port the engine is given (``port``) and its real adapters.

``netfilter`` runs the iptables binaries (both backends), ``conntrack`` deletes stale flows
over netlink, ``sysctl`` and ``nodeinfo`` read and set the node's settings and addresses.
Tests use the fakes of :mod:`iptsync.testing` in their place.
"""
