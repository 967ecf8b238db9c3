"""The node's proxier for each IP family it programs: kube-proxy's dual-stack meta-proxier.

kube-proxy runs one proxier per family (iptables and ip6tables) behind a meta-proxier that
hands every Service and Node to both and each EndpointSlice to the proxier of its address
type. :class:`FamilyEngines` does the same with :class:`~iptsync.engine.reconciler.Engine`:
each object is parsed once and its problems are reported once, and the parsed value goes to
every family's engine, which keeps its own family's ports and slices. Each engine has its own
kernel port (``iptables-*`` or ``ip6tables-*``, the same backend), its own render cache and its
own syncs, so the agent retries a family that failed on its own while the other keeps syncing.

Which families a node programs (:func:`choose_families`): the primary one (the family of the
first address naming the node; IPv4 when none does, kube-proxy's default) and the other one
when the node has an address of it. kube-proxy programs both whenever the kernel and
ip6tables can; iptsync leaves a family alone on a node without an address of it (an IPv4-only
node in a dual-stack cluster), which neither fails there nor gets rules no packet can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from iptsync.core.model import (
    EndpointSliceInfo,
    IPAddress,
    IPFamily,
    IPNetwork,
    NodeInfo,
    Problem,
    ServiceInfo,
    object_key,
    parse_object,
)
from iptsync.core.policy import Settings
from iptsync.core.state import ServiceKey
from iptsync.engine.reconciler import Engine, bulk, note_problems, stub

log = logging.getLogger("iptsync")


@dataclass(frozen=True)
class FamilyChoice:
    """The IP families a node programs, primary first, and why the other one is left out."""

    families: tuple[IPFamily, ...]
    left_out: Mapping[IPFamily, str]  # family -> why it is not programmed


def choose_families(node: str, evidence: Sequence[tuple[str, Sequence[IPAddress | IPNetwork]]],
                    ) -> FamilyChoice:
    """The families of ``node``: ``evidence`` is ``(where, addresses or CIDRs)`` in order of
    precedence; the first value names the primary family (IPv4 when there is none), and the
    other family is programmed when any value is of it."""
    values = [value for _where, found in evidence for value in found]
    primary = IPFamily.of(values[0]) if values else IPFamily.IPV4
    other = IPFamily.IPV6 if primary is IPFamily.IPV4 else IPFamily.IPV4
    if any(IPFamily.of(value) is other for value in values):
        return FamilyChoice((primary, other), {})
    where = ", ".join(where for where, _found in evidence)
    return FamilyChoice((primary,), {other: f"{node} has no {other.value} address "
                                            f"(none in {where})"})


def node_families(settings: Settings, interface_ips: Iterable[IPAddress]) -> FamilyChoice:
    """The families this node programs (``run``, ``diff --live``): those of ``--node-ip``
    and of its interfaces' addresses (loopback and link-local ones aside: every
    IPv6-enabled interface has an fe80:: address)."""
    usable = [ip for ip in interface_ips if not (ip.is_loopback or ip.is_link_local)]
    return choose_families(settings.node_name, [("--node-ip", settings.node_ips),
                                                ("the node's interfaces", usable)])


def offline_families(settings: Settings, node: NodeInfo | None) -> FamilyChoice:
    """The families a node has as seen from elsewhere (``dump``, ``diff --saved``): those of
    ``--node-ip`` and of its Node object's addresses; when neither names an address, those of
    ``--cluster-cidr``."""
    evidence: list[tuple[str, Sequence[IPAddress | IPNetwork]]] = [
        ("--node-ip", settings.node_ips),
        (f"the Node {settings.node_name}" if node else "a Node object",
         node.addresses if node else ())]
    if not any(found for _where, found in evidence):
        evidence.append(("--cluster-cidr", settings.cluster_cidrs))
    return choose_families(settings.node_name, evidence)


def announce(choice: FamilyChoice) -> None:
    """Say once, at start, which families are programmed and why any is not. (How each
    family tells pod traffic apart, or that it cannot, each engine says: the Node's pod CIDR
    may come later.)"""
    log.info("programming %s (primary %s)", " and ".join(f.value for f in choice.families),
             choice.families[0].value)
    for family, why in choice.left_out.items():
        log.info("%s is not programmed: %s; the %s addresses of Services get no rules here",
                 family.value, why, family.value)


def in_turn(engines: Sequence[Engine]) -> Iterator[Engine]:
    """``engines``, to sync one after the other. Once a sync has rendered and sent its rules,
    the next engine's due services render in a thread (:meth:`Engine.render_ahead`) while
    iptables-restore works in its own process: at 10,000 dual-stack services on legacy, the
    IPv6 services render during the IPv4 commit and the IPv6 sync starts with them ready.
    (Rendering ahead any earlier would slow the first engine's own rendering, which holds
    up its restore.)"""
    for index, engine in enumerate(engines):
        following = engines[index + 1] if index + 1 < len(engines) else None
        engine.when_rendered = following.render_ahead if following is not None else None
        try:
            yield engine
        finally:
            engine.when_rendered = None


class FamilyEngines:
    """One :class:`Engine` per IP family, primary first, fed the same objects.

    The input methods are :class:`Engine`'s (they return the services whose rules may change,
    in any family); the agent syncs each engine of :attr:`engines` on its own.
    """

    def __init__(self, engines: Iterable[Engine]) -> None:
        self.engines: dict[IPFamily, Engine] = {e.settings.family: e for e in engines}
        if not self.engines:
            raise ValueError("FamilyEngines needs at least one engine")
        self.problems: dict[tuple[str, str, str], Problem] = {}

    @property
    def primary(self) -> Engine:
        return next(iter(self.engines.values()))

    def tag(self, family: IPFamily) -> str:
        """A log line's prefix naming ``family``, when there is more than one."""
        return f"{family.value}: " if len(self.engines) > 1 else ""

    def upsert(self, manifest: Mapping[str, Any]) -> set[ServiceKey]:
        """Parse one object once, report its problems once, hand it to every family."""
        parsed = parse_object(manifest)
        note_problems(self.problems, manifest, parsed.problems)
        return set() if parsed.value is None else self.add(parsed.value)

    def add(self, value: ServiceInfo | EndpointSliceInfo | NodeInfo) -> set[ServiceKey]:
        dirty: set[ServiceKey] = set()
        for engine in self.engines.values():
            dirty |= engine.add(value)
        return dirty

    def delete(self, manifest: Mapping[str, Any]) -> set[ServiceKey]:
        self.problems.pop((str(manifest.get("kind") or ""), *object_key(manifest)), None)
        dirty: set[ServiceKey] = set()
        for engine in self.engines.values():
            dirty |= engine.delete(manifest)
        return dirty

    def replace_kind(self, kind: str, manifests: Iterable[Mapping[str, Any]]) -> set[ServiceKey]:
        """Make the objects of ``kind`` exactly ``manifests`` (a list or relist) in every
        family; the problems of objects no longer listed go too."""
        with bulk():
            listed = list(manifests)
            keep = {object_key(m) for m in listed}
            gone = {(namespace, name) for k, namespace, name in self.problems if k == kind}
            for engine in self.engines.values():
                gone |= engine.known(kind)
            dirty: set[ServiceKey] = set()
            for namespace, name in sorted(gone - keep):
                dirty |= self.delete(stub(kind, namespace, name))
            for manifest in listed:
                dirty |= self.upsert(manifest)
            return dirty
