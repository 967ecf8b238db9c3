"""The pure core: from Kubernetes objects to the rules and the batch that brings a node there.

``model`` (validated objects) -> ``state`` (the cluster as this node sees it) -> ``policy``
(what the rules decide) -> ``render`` + ``names`` (kube-proxy's chains) -> ``plan`` (desired
vs live: the minimal restore batch and its undo), with ``ruleset`` (rule text, iptables-save
parsing) and ``flows`` (which conntrack entries are stale). Nothing here runs a program, opens
a socket or imports an adapter; ``.importlinter`` enforces it.
"""
