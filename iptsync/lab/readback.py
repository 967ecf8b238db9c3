"""Read the rules back: what ``iptsync dump`` prints for one service, and what the nodes hold.

Why: the lab's strongest claim is that a node holds exactly what ``iptsync dump`` prints, and
that the ExternalName service left no trace. This module takes one service's rules out of a
dump (its entries in KUBE-SERVICES and KUBE-NODEPORTS and every chain reachable from them),
reads a node's live tables inside its namespace, and compares the two chain by chain in the
canonical form iptables-save prints; all of it per IP family (iptables and ip6tables). The
results are plain data; the checks judge them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iptsync.core.model import IPFamily
from iptsync.core.names import SVC_PREFIX, is_service_chain
from iptsync.core.ruleset import Rule, RulesetError, SavedTable, chain_line, parse_save, split_args
from iptsync.engine.desired import desired_from_objects
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import Backend
from iptsync.lab.scenario import LabService
from iptsync.lab.topology import Cluster
from iptsync.options import build_settings
from iptsync.sources.files import load_objects


@dataclass(frozen=True)
class DumpExcerpt:
    """The part of ``iptsync dump`` about one service in one IP family: its nat rules, chain
    by chain."""

    node: str
    service: str
    family: str
    """``IPv4`` (iptables) or ``IPv6`` (ip6tables)."""
    command: str
    chains: Mapping[str, tuple[Rule, ...]]
    """Chain -> the service's rules in it (KUBE-SERVICES, KUBE-NODEPORTS: only those naming
    the service; its own KUBE-SVC/EXT/SEP chains: all), in dump order."""
    services_with_svc_chain: tuple[str, ...]
    """Every ``namespace/name`` the full dump has a KUBE-SVC chain for."""

    @property
    def lines(self) -> list[str]:
        """The excerpt in iptables-restore form: chain declarations, then the rules."""
        return ([chain_line(name) for name in self.chains]
                + [rule.restore_line() for rules in self.chains.values() for rule in rules])


@dataclass(frozen=True)
class LiveComparison:
    """Whether a node's live nat rules of one family for the dumped service equal the dump."""

    node: str
    family: str
    command: str
    matches: bool
    compared: tuple[str, ...]
    """Chains compared (the dump excerpt's)."""
    differing: tuple[str, ...]
    """Chains whose live rules differ from the dump."""
    error: str | None = None


@dataclass(frozen=True)
class ExternalNameResult:
    """What the nodes hold for the ExternalName service (it should be nothing)."""

    service: str
    in_dump: bool
    """The dump has a KUBE-SVC chain for it."""
    live_mentions: Mapping[str, tuple[str, ...]]
    """Node -> live nat/filter lines naming the service, of both families."""
    live_svc_chains: Mapping[str, tuple[str, ...]]
    """Node -> the services that have a live KUBE-SVC chain, in either family."""
    error: str | None = None


@dataclass(frozen=True)
class OtherFamilyResult:
    """What the nodes hold for a single-stack service in the family it does not have (it
    should be nothing: an IPv6-only Service has no rule in iptables)."""

    service: str
    family: str
    """The family the service lacks, whose tables were searched."""
    live_mentions: Mapping[str, tuple[str, ...]]
    """Node -> lines of that family's nat and filter tables naming the service."""


@dataclass(frozen=True)
class ReadBack:
    """The rules read back from the nodes and what they were compared with."""

    dumps: tuple[DumpExcerpt, ...]
    """The dumped service's rules, one excerpt per IP family it has."""
    lives: tuple[LiveComparison, ...]
    """The dump node's live rules compared with each excerpt, in the same order."""
    external_name: ExternalNameResult
    other_family: tuple[OtherFamilyResult, ...]
    """Each single-stack service looked for in the other family's tables."""


def _comments(args: Sequence[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--comment"]


def _names_service(args: Sequence[str], ref: str) -> bool:
    """True when a ``--comment`` of the rule names ``ref`` (``namespace/name``) as a word."""
    return any(ref in comment.split() for comment in _comments(args))


def _jump_target(args: Sequence[str]) -> str | None:
    for flag in ("-j", "-g"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return None


def _svc_chain_services(chains: Mapping[str, Sequence[Sequence[str]]]) -> tuple[str, ...]:
    """``namespace/name`` of every service owning a KUBE-SVC chain (from its rules' comments)."""
    found: set[str] = set()
    for chain, rules in chains.items():
        if chain.startswith(SVC_PREFIX):
            found.update(c.split()[0] for args in rules for c in _comments(args) if c.split())
    return tuple(sorted(found))


def service_chains(nat: Mapping[str, Sequence[Rule]], ref: str) -> dict[str, tuple[Rule, ...]]:
    """The rules of ``ref`` in a nat table: its entries in KUBE-SERVICES and KUBE-NODEPORTS,
    then every per-service chain reachable from them, in the table's order."""
    entries: dict[str, tuple[Rule, ...]] = {}
    for entry in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
        rules = tuple(rule for rule in nat.get(entry, ()) if _names_service(rule.args, ref))
        if rules:
            entries[entry] = rules
    reachable: set[str] = set()
    queue = [_jump_target(rule.args) for rules in entries.values() for rule in rules]
    while queue:
        chain = queue.pop()
        if chain is None or chain in reachable or not is_service_chain(chain):
            continue
        reachable.add(chain)
        queue.extend(_jump_target(rule.args) for rule in nat.get(chain, ()))
    return {chain: entries.get(chain, tuple(rules)) for chain, rules in nat.items()
            if chain in entries or chain in reachable}


def dump_command(manifests: Path, node: str, cluster_cidr: str, family: str) -> str:
    """The ``iptsync dump`` command line the excerpt is taken from (paths relative to here)."""
    try:
        objects = str(manifests.resolve().relative_to(Path.cwd()))
    except ValueError:
        objects = str(manifests)
    return (f"iptsync dump --objects {objects} --hostname-override {node} "
            f"--cluster-cidr {cluster_cidr} --ip-family {family}")


def dump_service(manifests: Path, node: str, ref: str, cluster_cidr: str,
                 family: str = "IPv4") -> DumpExcerpt:
    """What ``iptsync dump --ip-family FAMILY`` prints for service ``ref`` on ``node`` (same
    code path; no root). ``cluster_cidr`` is ``--cluster-cidr``: one CIDR per family."""
    loaded = load_objects([manifests])
    settings = build_settings(node_name=node, cluster_cidr=cluster_cidr, masquerade_all=False,
                              masquerade_bit=14, nodeport_addresses=None, node_ips=(),
                              localhost_nodeports=True).for_family(IPFamily(family))
    tables = desired_from_objects(loaded.objects, settings).tables.tables
    nat = {chain: [Rule(chain, tuple(split_args(line)[2:])) for line in content.lines]
           for chain, content in tables.get("nat", {}).items()}
    return DumpExcerpt(
        node=node, service=ref, family=family,
        command=dump_command(manifests, node, cluster_cidr, family),
        chains=service_chains(nat, ref),
        services_with_svc_chain=_svc_chain_services(
            {chain: [rule.args for rule in rules] for chain, rules in nat.items()}),
    )


def save_command(backend: str, table: str, family: str = "IPv4") -> str:
    """``iptables-nft-save -t nat``, ``ip6tables-legacy-save -t filter``, ..."""
    netfilter = Netfilter(Backend(backend), family=IPFamily(family))
    return f"{netfilter.command}-save -t {table}"


def live_tables(cluster: Cluster, node: str, backend: str,
                family: str = "IPv4") -> dict[str, str]:
    """``iptables-save`` (``ip6tables-save`` for IPv6) text of the nat and filter tables
    inside ``node``'s namespace."""
    netfilter = Netfilter(Backend(backend), netns=cluster.ns(node), family=IPFamily(family))
    return {table: netfilter.save_text(table) for table in ("nat", "filter")}


def compare_live(dump: DumpExcerpt, nat_text: str, command: str) -> LiveComparison:
    """Compare the dumped rules with a node's live nat table of the dump's family (canonical
    form, chain by chain)."""
    try:
        live = parse_save(nat_text).get("nat", SavedTable("nat"))
    except RulesetError as exc:
        return LiveComparison(dump.node, dump.family, command, False, tuple(dump.chains), (),
                              f"cannot parse: {exc}")
    differing: list[str] = []
    for chain, rules in dump.chains.items():
        have = live.chains.get(chain, [])
        if not is_service_chain(chain):
            have = [c for c in have if _names_service(split_args(c), dump.service)]
        if [rule.canonical for rule in rules] != have:
            differing.append(chain)
    return LiveComparison(dump.node, dump.family, command, not differing, tuple(dump.chains),
                          tuple(differing))


def external_name_result(service: LabService, dumps: Sequence[DumpExcerpt],
                         live: Mapping[str, Mapping[str, str]],
                         error: str | None = None) -> ExternalNameResult:
    """Look for any trace of the ExternalName ``service`` in the dumps and the nodes' tables
    (``live``: node -> table -> save text, the tables of both families under keys such as
    ``nat`` and ``ip6 nat``)."""
    mentions: dict[str, tuple[str, ...]] = {}
    svc_chains: dict[str, tuple[str, ...]] = {}
    for node, tables in live.items():
        mentions[node] = tuple(line for text in tables.values() for line in text.splitlines()
                               if service.name in line)
        found: set[str] = set()
        for key, text in tables.items():
            if not key.endswith("nat"):
                continue
            try:
                nat = parse_save(text).get("nat", SavedTable("nat"))
            except RulesetError as exc:
                error = error or f"{node}: cannot parse the {key} table: {exc}"
                continue
            found.update(_svc_chain_services(
                {chain: [split_args(c) for c in rules] for chain, rules in nat.chains.items()}))
        svc_chains[node] = tuple(sorted(found))
    in_dump = any(service.ref in dump.services_with_svc_chain for dump in dumps)
    return ExternalNameResult(service.ref, in_dump, mentions, svc_chains, error)


def other_family_result(service: LabService, live: Mapping[str, Mapping[str, str]],
                        family_prefix: Mapping[str, str]) -> OtherFamilyResult:
    """Look for ``service`` (single-stack) in the tables of the family it does not have;
    ``live`` as for :func:`external_name_result`, its keys spelt by ``family_prefix``."""
    (has,) = service.families
    other = "IPv4" if has == "IPv6" else "IPv6"
    keys = {family_prefix[other] + table for table in ("nat", "filter")}
    return OtherFamilyResult(service.ref, other, {
        node: tuple(line for key, text in tables.items() if key in keys
                    for line in text.splitlines() if _names_service(split_args(line), service.ref))
        for node, tables in live.items()})
