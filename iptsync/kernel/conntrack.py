"""Clear stale UDP and SCTP conntrack entries: the pyroute2 adapter.

Which entries are stale is decided by :mod:`iptsync.core.flows` (pure); this module dumps the
node's conntrack table over netlink and deletes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from iptsync.core.flows import Destination, Flow, stale

log = logging.getLogger(__name__)


def clear_stale_flows(targets: dict[Destination, frozenset[str]]) -> int:
    """Delete stale entries from this network namespace's conntrack table; returns the count."""
    if not targets:
        return 0
    from pyroute2 import Conntrack  # noqa: PLC0415  (netlink socket only when needed)

    deleted = 0
    ct = Conntrack()
    try:
        protos = {dest[0] for dest in targets}
        # Collect first: pyroute2's dump generator breaks if the socket is used meanwhile.
        doomed = [(entry, flow) for entry, flow in _flows(ct, protos) if stale(flow, targets)]
        for entry, flow in doomed:
            ct.delete(entry)
            deleted += 1
            log.info("deleted stale conntrack entry %s:%d -> %s:%d", flow.orig_dst,
                     flow.orig_dport, flow.reply_src, flow.reply_sport)
    finally:
        ct.close()
    return deleted


def _flows(ct: object, protos: set[int]) -> Iterator[tuple[object, Flow]]:
    entries: Iterable[object] = ct.dump_entries()  # type: ignore[attr-defined]
    for entry in entries:
        orig, reply = entry.tuple_orig, entry.tuple_reply  # type: ignore[attr-defined]
        if orig.proto not in protos or orig.daddr is None or reply.saddr is None:
            continue
        yield entry, Flow(orig.proto, orig.daddr, orig.dport or 0, reply.saddr,
                          reply.sport or 0)
