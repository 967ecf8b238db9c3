"""The ``iptsync`` command line: builds settings and adapters, holds no logic of its own.

Flag names and meanings follow kube-proxy's.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import IO, Any, TypeVar

import click

from iptsync.agent.health import (
    BIND_RETRY_INTERVAL,
    HealthServer,
    HealthState,
    HttpServer,
    MetricsServer,
    PendingServer,
    ServiceHealthServers,
    parse_bind_address,
)
from iptsync.agent.loop import Agent, Timing
from iptsync.agent.metrics import Metrics
from iptsync.commandline import (
    KubeProxyCommand,
    klog_verbosity,
    kube_proxy_options,
    log_verdicts,
    proxy_config,
)
from iptsync.core.model import IPAddress, IPFamily, Problem
from iptsync.core.plan import cleanup_plan
from iptsync.core.policy import Settings
from iptsync.core.ruleset import RulesetError
from iptsync.engine.apply import STAGE_LINES, SyncError, apply_plan
from iptsync.engine.desired import Desired, desired_per_family, report
from iptsync.engine.families import (
    FamilyChoice,
    FamilyEngines,
    announce,
    in_turn,
    node_families,
)
from iptsync.engine.reconciler import Engine, bulk
from iptsync.engine.rendercache import DEFAULT_DIR as DEFAULT_RENDER_CACHE_DIR
from iptsync.engine.rendercache import RenderCache
from iptsync.kernel.conntrack import clear_stale_flows
from iptsync.kernel.netfilter import Netfilter, detect_backend
from iptsync.kernel.nodeinfo import interface_addresses
from iptsync.kernel.port import Backend, NetfilterError
from iptsync.kernel.sysctl import apply_conntrack, ensure_proxy_sysctls, tcp_be_liberal
from iptsync.kernel.watch import ChangeWatch
from iptsync.logs import setup_logging
from iptsync.options import (
    OptionError,
    ProxyConfig,
    effective_document,
    parse_duration,
    parse_ips,
    settings_from_config,
)
from iptsync.sources.base import Source
from iptsync.sources.files import LoadedObjects, load_objects

F = TypeVar("F", bound=Callable[..., Any])


def node_options(func: F) -> F:
    """The flags that say which node this is and how its rules are shaped: kube-proxy's whole
    command line (iptsync.kubeproxy), and iptsync's own."""
    decorators = [
        click.option("--objects", "objects", multiple=True, type=click.Path(exists=True),
                     help="Manifest file or directory (YAML/JSON, multi-document, kind: List)."),
        kube_proxy_options,
        click.option("--node-ip", "node_ips", multiple=True,
                     help="A node address, one per IP family (repeatable, or comma-separated); "
                          "default: the Node object's addresses."),
        click.option("-v", "--verbose", count=True,
                     help="More logging: -v info, -vv debug, -vvv libraries' debug too "
                          "(run starts at info: one v fewer). kube-proxy's --v=N is read too."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def settings_from(params: dict[str, Any], config: ProxyConfig | None = None) -> Settings:
    """Settings for this node from the configuration in effect (read from ``params`` when
    not given) and iptsync's --node-ip flags."""
    if config is None:
        # proxy_config takes kube-proxy's flags out of params: a command that asks twice
        # (diff, trace) gets the settings of the first time, not the defaults.
        if isinstance(known := params.get(_SETTINGS), Settings):
            return known
        config = proxy_config(params)
        log_verdicts(config, config_path(config))
    try:
        settings = settings_from_config(
            config, node_name=(config.hostname_override.strip() or socket.gethostname()).lower(),
            node_ips=parse_ips(params["node_ips"], "--node-ip"))
    except OptionError as err:
        raise click.UsageError(str(err)) from None
    params[_SETTINGS] = settings
    return settings


_SETTINGS = "_settings"  # where settings_from keeps what it read in a command's params


def config_path(config: ProxyConfig) -> str | None:
    return str(config.config_file) or None


def load_checked(paths: Iterable[str], *, as_json: bool = False) -> LoadedObjects:
    """The objects of ``--objects``, refusing input that cannot be used.

    A path that cannot be read or parsed, or yields no Kubernetes object, would make a
    command act on part of the objects (a sync delete the Services of a file with a typo):
    every problem is logged, with ``as_json`` printed as the ``problems`` list, and the
    command fails.
    """
    loaded = load_objects(paths)
    if not loaded.errors:
        return loaded
    report(problem for problem in loaded.problems if problem not in loaded.errors)
    for error in loaded.errors:
        logging.getLogger("iptsync").error("%s", error)
    if as_json:
        print_json({"problems": problems_json(loaded.problems)})
    raise click.ClickException(
        f"--objects: {len(loaded.errors)} unusable file(s) or path(s), listed above; nothing done")


def desired_from_params(params: dict[str, Any], *, as_json: bool = False,
                        interface_ips: Iterable[Any] = (),
                        family: IPFamily = IPFamily.IPV4) -> Desired:
    """The rules of one IP family for ``--objects`` and the node flags; every problem logged
    and kept in :attr:`Desired.problems`, the input's first."""
    [desired] = desired_per_family_from_params(params, [family], as_json=as_json,
                                               interface_ips=interface_ips)
    return desired


def desired_per_family_from_params(params: dict[str, Any],
                                   families: Sequence[IPFamily] | None, *,
                                   as_json: bool = False, interface_ips: Iterable[Any] = (),
                                   ) -> list[Desired]:
    """The rules of each of ``families`` (None: each family the node has, as the objects and
    flags say) for ``--objects``; every problem logged once and kept in each
    :attr:`Desired.problems`, the input's first."""
    settings = settings_from(params)
    loaded = load_checked(params["objects"], as_json=as_json)
    found = desired_per_family(loaded.objects, settings, families, interface_ips)
    problems = [*loaded.problems, *found[0].problems]
    for desired in found:
        desired.problems = problems
    report(problems)
    return found


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def problems_json(problems: Iterable[Problem]) -> list[dict[str, str]]:
    """The ``problems`` list of every JSON output."""
    return [{"kind": p.kind, "object": p.ref, "field": p.field, "message": p.message,
             "dropped": p.dropped} for p in problems]


@click.group()
@click.version_option(package_name="iptsync")
def main() -> None:
    """iptsync: kube-proxy's iptables mode, with incremental syncs and real debugging."""


FAMILY_CHOICE = click.Choice([family.value for family in IPFamily])
RESTORE_COMMAND = {IPFamily.IPV4: "iptables-restore --noflush",
                   IPFamily.IPV6: "ip6tables-restore --noflush"}


@main.command(cls=KubeProxyCommand)
@node_options
@click.option("--format", "output_format", type=click.Choice(["restore", "json"]),
              default="restore", show_default=True, help="iptables-restore text or JSON.")
@click.option("--ip-family", "ip_family", type=FAMILY_CHOICE, default=None,
              help="Print this family's payload only, to pipe into its restore command "
                   "(default: each family the node has, each after a comment line naming "
                   "its restore command).")
def dump(output_format: str, ip_family: str | None, **params: Any) -> None:
    """Print the rules a full sync would write (iptables-restore input). Needs no root.

    Without --ip-family, the families of --node-ip and of the Node object's addresses (when
    neither names one, of --cluster-cidr; IPv4 when nothing does)."""
    # A short-lived process building a few million objects: the cyclic collector would
    # rescan them again and again for nothing (a third of the time at 10k services).
    gc.disable()
    setup_logging(params.pop("verbose"))
    families = [IPFamily(ip_family)] if ip_family else None
    found = desired_per_family_from_params(params, families, as_json=output_format == "json")
    if output_format == "json":
        print_json({"families": [dump_json(desired) for desired in found],
                    "problems": problems_json(found[0].problems)})
        return
    for desired in found:
        if families is None:
            sys.stdout.write(f"# {RESTORE_COMMAND[desired.settings.family]}\n")
        sys.stdout.write(desired.payload())


def dump_json(desired: Desired) -> dict[str, Any]:
    """One family's dump: tables, chains, rules (restore and canonical form), jumps."""
    family = desired.settings.family
    return {
        "family": family.value,
        "restore": RESTORE_COMMAND[family],
        "node": desired.settings.node_name,
        "tables": {
            table: {chain: [{"rule": line, "canonical": rule} for line, rule in
                            zip(content.lines, content.canonical_rules(), strict=True)]
                    for chain, content in chains.items()}
            for table, chains in desired.tables.tables.items()
        },
        "jumps": [{"table": j.table, "chain": j.chain, "rule": j.rule.restore_line()}
                  for j in desired.tables.jumps],
        "problems": problems_json(desired.problems),
    }


def backend_option(default: str) -> Callable[[F], F]:
    choices = ["auto", "nft", "legacy", "both"] if default == "both" else ["auto", "nft", "legacy"]
    return click.option("--iptables-backend", "backend", type=click.Choice(choices),
                        default=default, show_default=True,
                        help="iptables kernel backend; auto detects what the node uses.")


def resolve_backend(choice: str) -> Backend:
    return detect_backend() if choice == "auto" else Backend(choice)


@main.command(cls=KubeProxyCommand)
@node_options
@backend_option("auto")
@click.option("--once", is_flag=True, help="Sync this network namespace once and exit.")
@click.option("--full-sync-period", default="1h", show_default=True,
              help="Time between full compares of every rule, while the change watch sees "
                   "nothing (kube-proxy's hourly full sync).")
@click.option("--canary-interval", default="5s", show_default=True, hidden=True,
              help="How often to look for the canary chain.")
@click.option("--progress-interval", default="5s", show_default=True, hidden=True,
              help="How often a long sync logs how far it got.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Plain text or one JSON object per line.")
@click.option("--no-conntrack-cleanup", is_flag=True,
              help="Do not delete stale UDP conntrack entries after syncs.")
@click.option("--render-cache-dir", default=DEFAULT_RENDER_CACHE_DIR, show_default=True,
              envvar="IPTSYNC_RENDER_CACHE_DIR",
              help="Where to keep the rendered rules for the next start, which then renders "
                   "only what changed (docs/operations.md); empty: keep nothing.")
def run(backend: str, once: bool, log_format: str, no_conntrack_cleanup: bool,
        render_cache_dir: str, **params: Any) -> None:
    """Keep the node's iptables rules in sync with the Services and EndpointSlices.

    Watches the API (in-cluster config, or --kubeconfig) or --objects files. With --once,
    syncs once and exits. Takes kube-proxy's command line and KubeProxyConfiguration
    (--config) with kube-proxy's meanings (docs/comparison.md lists every flag and field).
    """
    verbose = params.pop("verbose")
    config = proxy_config(params)
    setup_logging(max(verbose + 1, klog_verbosity(config.verbosity)),
                  "json" if config.logging_format == "json" else log_format)
    log_verdicts(config, config_path(config))
    if config.write_config_to:
        sys.exit(write_config(config))
    if config.cleanup:
        sys.exit(1 if cleanup_rules([resolve_backend(backend)]) else 0)
    settings = settings_from(params, config)
    apply_conntrack(config.conntrack)
    if config.init_only:
        ensure_proxy_sysctls(settings.localhost_nodeports)
        return
    # Read after applying (tcpBeLiberal may have set it): 1 leaves out the INVALID drop rule.
    settings = replace(settings, conntrack_tcp_be_liberal=tcp_be_liberal())
    try:
        progress_interval = parse_duration(params["progress_interval"], "--progress-interval")
    except OptionError as err:
        raise click.UsageError(str(err)) from None
    chosen = resolve_backend(backend)
    interface_ips = interface_addresses()
    choice = installed_families(node_families(settings, interface_ips), chosen)
    announce(choice)
    engines = FamilyEngines(
        Engine(netfilter, settings.for_family(family), interface_ips=interface_ips,
               flows=None if no_conntrack_cleanup else clear_stale_flows,
               stage_lines=STAGE_LINES[chosen], progress_interval=progress_interval,
               watch=None if once else open_change_watch(netfilter),
               render_cache=RenderCache(render_cache_dir, family) if render_cache_dir else None)
        for family in choice.families
        for netfilter in [Netfilter(chosen, family=family)])
    ipv4 = engines.engines.get(IPFamily.IPV4)
    ensure_proxy_sysctls(ipv4 is not None and ipv4.settings.nodeports_on_localhost)
    if once:
        if not params["objects"]:
            raise click.UsageError("--once needs --objects")
        sys.exit(run_once(engines, params["objects"]))
    try:
        timing = Timing(
            min_sync_period=config.min_sync_period, sync_period=config.sync_period,
            canary_interval=parse_duration(params["canary_interval"], "--canary-interval"),
            full_sync_period=parse_duration(params["full_sync_period"], "--full-sync-period"))
        healthz = bind_address(config.healthz_address(), "--healthz-bind-address")
        metrics_at = bind_address(config.metrics_address(), "--metrics-bind-address")
    except (OptionError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    run_agent(engines, make_sources(params["objects"], config, settings.node_name),
              timing, healthz, metrics_at, hard_fail=config.bind_address_hard_fail)


def open_change_watch(netfilter: Netfilter) -> ChangeWatch | None:
    """The backend's change watch; without one, everything is compared every sync period."""
    try:
        return netfilter.change_watch()
    except OSError as err:
        logging.getLogger("iptsync").warning(
            "cannot watch the kernel for changes by other programs (%s); comparing every "
            "rule every sync period instead", err)
        return None


def write_config(config: ProxyConfig) -> int:
    """kube-proxy's --write-config-to: the configuration in effect, as a file; exit status."""
    import yaml  # noqa: PLC0415  (only this path writes YAML)

    try:
        with open(config.write_config_to, "w") as out:
            yaml.safe_dump(effective_document(config), out, sort_keys=True)
    except OSError as err:
        logging.getLogger("iptsync").error("--write-config-to %s: %s", config.write_config_to,
                                           err.strerror or err)
        return 1
    logging.getLogger("iptsync").info("wrote the configuration to %s", config.write_config_to)
    return 0


def installed_families(choice: FamilyChoice, backend: Backend) -> FamilyChoice:
    """``choice`` without the families whose restore command is missing, each named in a
    warning (kube-proxy runs single-stack without ip6tables); none left is an error."""
    missing = {family: f"{Netfilter(backend, family=family).command}-restore is not installed"
               for family in choice.families if not Netfilter(backend, family=family).present()}
    families = tuple(family for family in choice.families if family not in missing)
    if not families:
        raise click.ClickException("; ".join(missing.values()))
    for family, why in missing.items():
        logging.getLogger("iptsync").warning("%s is not programmed: %s (the node has an %s "
                                             "address)", family.value, why, family.value)
    return FamilyChoice(families, choice.left_out)


def bind_address(text: str, what: str) -> tuple[str, int] | None:
    return parse_bind_address(text, what) if text else None


def run_once(engines: FamilyEngines, paths: tuple[str, ...]) -> int:
    """One full sync of every family; 1 when any of them failed (the others are synced)."""
    # The live tables are read while the manifests load and render: on a node holding
    # every rule (a restart), iptables-save takes about as long as all of that.
    for engine in engines.engines.values():
        engine.read_ahead()
    loaded = load_checked(paths)
    report(loaded.problems)
    with bulk():
        for obj in loaded.objects:
            engines.upsert(obj)
    del loaded  # the manifests (90 MB at 10k services) are not needed for the sync
    status = 0
    for engine in in_turn(list(engines.engines.values())):
        family = engine.settings.family
        try:
            result = engine.sync(full=True)
        except (SyncError, NetfilterError, RulesetError) as err:
            logging.getLogger("iptsync").error("%s%s", engines.tag(family), err)
            status = 1
            continue
        logging.getLogger("iptsync").info("%s%s", engines.tag(family), result.line())
    for engine in engines.engines.values():
        engine.keep_renderings()  # renderings are worth keeping whether their sync went well
    return status


def make_sources(objects: tuple[str, ...], config: ProxyConfig,
                 node_name: str) -> list[Source]:
    if objects:
        from iptsync.sources.files import FilesSource  # noqa: PLC0415

        return [FilesSource(objects)]
    from iptsync.sources.api import ApiConfigError, ApiSource  # noqa: PLC0415  (slow import)

    try:
        return [ApiSource(node_name, kubeconfig=config.kubeconfig or None,
                          master=config.master or None)]
    except ApiConfigError as err:
        raise click.ClickException(f"cannot reach the API server: {err}") from None


def run_agent(engines: FamilyEngines, sources: list[Source], timing: Timing,
              healthz: tuple[str, int] | None, metrics_at: tuple[str, int] | None, *,
              hard_fail: bool = False) -> None:
    """Serve health and metrics, run the loop until SIGTERM or SIGINT; rules stay in place."""
    metrics = Metrics()
    health = HealthState(2 * timing.sync_period,
                         families=[family.value for family in engines.engines])
    servers: list[HttpServer | PendingServer] = []
    wanted: list[tuple[str, tuple[str, int] | None, Callable[[tuple[str, int]], HttpServer]]] = [
        ("--healthz-bind-address", healthz, lambda at: HealthServer(at, health, metrics)),
        ("--metrics-bind-address", metrics_at,
         lambda at: MetricsServer(at, metrics.registry, health))]
    for flag, address, serve in wanted:
        if address is None:
            continue
        try:
            servers.append(serve(address))
        except OSError as err:
            host, port = address
            what = f"{flag} {host or '0.0.0.0'}:{port}"
            why = (f"cannot listen there: {err.strerror or err} (another process, or another "
                   f"iptsync or kube-proxy, may hold the port")
            if not hard_fail:
                # kube-proxy's default: keep proxying, and take the port once it is free.
                logging.getLogger("iptsync").error(
                    "%s: %s); trying again every %.0fs (--bind-address-hard-fail makes this "
                    "fatal)", what, why, BIND_RETRY_INTERVAL)
                servers.append(PendingServer(partial(serve, address), what))
                continue
            for server in servers:
                server.close()
            raise click.ClickException(
                f"{what}: {why}; choose another address or an empty one to disable "
                f"it)") from None
    agent = Agent(engines, sources, timing=timing, metrics=metrics, health=health,
                  service_health=ServiceHealthServers(proxy_healthy=health.healthy))

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("iptsync").info("received %s, stopping",
                                          signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    primary = engines.primary
    logging.getLogger("iptsync").info(
        "starting on node %s (%s backend, %s); min sync period %.1fs, sync period %.1fs",
        primary.settings.node_name,
        primary.netfilter.backend.value if primary.netfilter else "-",
        " and ".join(family.value for family in engines.engines),
        timing.min_sync_period, timing.sync_period)
    try:
        agent.run()
    finally:
        for server in servers:
            server.close()


@main.command()
@backend_option("both")
@click.option("-v", "--verbose", count=True, help="More logging.")
def cleanup(backend: str, verbose: int) -> None:
    """Remove every chain and jump rule iptsync (or kube-proxy) owns, in both IP families
    (iptables and ip6tables); leave everything else."""
    setup_logging(verbose + 1)
    backends = list(Backend) if backend == "both" else [resolve_backend(backend)]
    if cleanup_rules(backends):
        sys.exit(1)


def cleanup_rules(backends: Iterable[Backend]) -> bool:
    """Remove iptsync's (kube-proxy's) chains and jumps on each backend; whether any failed."""
    failed = False
    for chosen in backends:
        for family in IPFamily:
            netfilter = Netfilter(chosen, family=family)
            if family is IPFamily.IPV6 and not netfilter.present():
                logging.getLogger("iptsync").info("cleanup (%s): not installed, nothing to "
                                                  "remove", netfilter.command)
                continue
            try:
                plan = cleanup_plan(netfilter.save())
                apply_plan(netfilter, plan)
            except (SyncError, NetfilterError, RulesetError, FileNotFoundError) as err:
                logging.getLogger("iptsync").error("cleanup (%s): %s", netfilter.command, err)
                failed = True
                continue
            logging.getLogger("iptsync").info("cleanup (%s): %s", netfilter.command,
                                              plan.summary())
    return failed


@main.command(cls=KubeProxyCommand)
@node_options
@backend_option("auto")
@click.option("--src", required=True, help="Source IP of the connection (IPv4 or IPv6).")
@click.option("--dst", required=True,
              help="Destination IP:PORT, or [IPv6]:PORT (service, node or LB IP); its family "
                   "picks the rules traced (iptables or ip6tables).")
@click.option("--proto", type=click.Choice(["tcp", "udp", "sctp"]), default="tcp",
              show_default=True, help="Protocol.")
@click.option("--from", "origin", type=click.Choice(["pod", "node", "external"]),
              default=None, help="Where the packet enters: a pod, the node itself, outside "
              "(default: node for a node or loopback address, pod inside --cluster-cidr "
              "(NodeCIDR: the node's pod CIDR), else external).")
@click.option("--live", is_flag=True,
              help="Trace the rules netfilter holds now in this network namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def trace(*, backend: str, src: str, dst: str, proto: str, origin: str | None, live: bool,
          as_json: bool, **params: Any) -> None:
    """Trace a new connection through the rules: endpoints and odds, masquerade, or where it
    is dropped or rejected, with the rules that decided it. --live reads this namespace's
    rules (root); --objects renders them from manifests (no root). The destination's IP family
    picks the rules: iptables for IPv4, ip6tables for IPv6 (--dst [fd00::1]:80)."""
    from iptsync.inspection import trace as tracer  # noqa: PLC0415  (keeps this command's imports local)

    setup_logging(params.pop("verbose"))
    if live == bool(params["objects"]):
        raise click.UsageError("give either --live or --objects")
    problems: list[Problem] = []
    try:
        packet = tracer.make_packet(src, dst, proto)
        settings = settings_from(params).for_family(packet.family)
        if live:
            netfilter = Netfilter(resolve_backend(backend), family=packet.family)
            tables = tracer.from_saved(netfilter.save(("filter", "nat")))
            node_ips = tuple(ip for ip in dict.fromkeys((*settings.node_ips,
                                                         *interface_addresses()))
                             if IPFamily.of(ip) is packet.family)
        else:
            desired = desired_from_params(params, as_json=as_json, family=packet.family)
            tables, node_ips = tracer.from_desired(desired.tables), desired.settings.node_ips
            problems, settings = desired.problems, desired.settings
    except tracer.TraceError as err:
        raise click.UsageError(str(err)) from None
    except (NetfilterError, FileNotFoundError) as err:
        raise click.ClickException(f"cannot read the live rules: {err}") from None
    detector = settings.local_detector
    pods = (detector.cidr,) if detector and detector.cidr else settings.cluster_cidrs
    chosen = origin or tracer.default_origin(packet.src, pods, node_ips)
    result = tracer.trace(tables, packet, origin=chosen, node_ips=node_ips,
                          pod_interface=detector.interface if detector else None)
    if as_json:
        print_json({**tracer.result_json(result), "problems": problems_json(problems)})
    else:
        sys.stdout.write(tracer.render_text(result))


@main.command(cls=KubeProxyCommand)
@node_options
@click.argument("service")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def explain(*, service: str, as_json: bool, **params: Any) -> None:
    """Explain SERVICE (namespace/name[:port], port by name; without it, every port).

    For each node role (this node, each node running endpoints, any other node), each entry
    point (cluster IP, external and load-balancer IPs, NodePort) and each kind of client
    (pods, the node, outside): which endpoints get the traffic and with what probability,
    whether it is masqueraded, or why it is rejected or dropped, and why each endpoint left
    out is left out; a dual-stack Service in each of its IP families. Reads --objects; needs
    no root.
    """
    from iptsync.inspection import explain as explainer  # noqa: PLC0415  (keeps this command's imports local)

    setup_logging(params.pop("verbose"))
    if not params["objects"]:
        raise click.UsageError("--objects is required")
    try:
        ref = explainer.parse_service_ref(service)
    except explainer.ExplainError as err:
        raise click.UsageError(str(err)) from None
    # Every family, whichever the node has: a note says when it has no address of one.
    families = desired_per_family_from_params(params, list(IPFamily), as_json=as_json)
    try:
        result = explainer.explain([(d.state, d.settings) for d in families], ref)
    except explainer.ExplainError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        print_json({**explainer.explanation_json(result),
                    "problems": problems_json(families[0].problems)})
    else:
        sys.stdout.write(explainer.render_text(result))


@main.command(cls=KubeProxyCommand)
@node_options
@backend_option("auto")
@click.option("--live", is_flag=True,
              help="Compare with the rules netfilter holds now in this network namespace "
                   "(each IP family the node programs).")
@click.option("--saved", type=click.File("r"), default=None,
              help="Compare with an iptables-save file instead (- for stdin).")
@click.option("--ip-family", "ip_family", type=FAMILY_CHOICE, default=None,
              help="Compare this family only (with --saved: the family of the file; "
                   "default: the node's primary family).")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def diff(*, backend: str, live: bool, saved: IO[str] | None, ip_family: str | None,
         as_json: bool, **params: Any) -> None:
    """Show what a sync would change: chains to create, chains to rewrite with the rules
    removed (-) and added (+), chains to delete, jumps to insert. Exits 0 when nothing would
    change, 1 when something would, 2 on error (like diff)."""
    from iptsync.core.plan import make_plan  # noqa: PLC0415
    from iptsync.core.ruleset import parse_save  # noqa: PLC0415
    from iptsync.inspection import diffview  # noqa: PLC0415  (keeps this command's imports local)

    setup_logging(params.pop("verbose"))
    if live == (saved is not None):
        raise click.UsageError("give either --live or --saved FILE")
    if not params["objects"]:
        raise click.UsageError("--objects is required")
    families = [IPFamily(ip_family)] if ip_family else None
    interface_ips: list[IPAddress] = []
    try:
        if saved is not None:
            saved_tables = parse_save(saved.read())
        else:
            chosen = resolve_backend(backend)
            interface_ips = interface_addresses()  # as `iptsync run` renders for this node
            if families is None:
                families = list(installed_families(
                    node_families(settings_from(params), interface_ips), chosen).families)
        found = desired_per_family_from_params(params, families, as_json=as_json,
                                               interface_ips=interface_ips)
        if saved is not None:
            found = found[:1]  # one file: one family's rules (the primary's by default)
        reports = []
        for desired in found:
            family = desired.settings.family
            if saved is not None:
                current, label = saved_tables, f"rules in {saved.name}"
            else:
                netfilter = Netfilter(chosen, family=family)
                current = netfilter.save()
                label = (f"live rules ({netfilter.backend.value})" if len(found) == 1
                         else f"live {family.value} rules ({netfilter.backend.value})")
            reports.append((desired, label, diffview.diff_report(
                make_plan(desired.tables, current), current, desired.tables)))
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except (NetfilterError, RulesetError, OSError) as err:
        click.echo(f"Error: cannot read the rules: {err}", err=True)
        sys.exit(2)
    changed = any(changes.changed for _desired, _label, changes in reports)
    if as_json:
        print_json({"changed": changed, "families": [
            {"family": desired.settings.family.value, **diffview.report_json(changes),
             "problems": problems_json(desired.problems)}
            for desired, _label, changes in reports],
            "problems": problems_json(reports[0][0].problems)})
    else:
        for desired, label, changes in reports:
            rules = "rules" if len(reports) == 1 else f"{desired.settings.family.value} rules"
            sys.stdout.write(diffview.render_text(
                changes, live_label=label,
                desired_label=f"the {rules} a sync for {desired.settings.node_name} writes"))
    sys.exit(1 if changed else 0)


@main.command("check-config", context_settings={"ignore_unknown_options": True,
                                                 "allow_interspersed_args": False})
@click.option("-f", "--file", "files", multiple=True, type=click.File("r"),
              help="kube-proxy's DaemonSet (or static Pod) manifest, the ConfigMap its "
                   "--config file is mounted from, or a KubeProxyConfiguration (- for stdin; "
                   "repeatable; multi-document YAML and kind: List are read).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def check_config(files: tuple[IO[str], ...], args: tuple[str, ...]) -> None:
    """Say what iptsync would do with each of kube-proxy's flags and configuration fields.

    ARGS: a kube-proxy argument list (after `--`), alone or on top of the manifests. Prints,
    for every flag and field given, `same` (iptsync does what kube-proxy does), `ignored`
    (and why) or `refused` (and why); exits 1 if anything would be refused, 2 if the input
    cannot be read.
    """
    from iptsync import checkconfig  # noqa: PLC0415  (keeps this command's imports local)

    try:
        objects = [obj for file in files
                   for obj in checkconfig.documents(file.read(), file.name)]
        config = checkconfig.judge(checkconfig.invocation(objects, list(args)))
    except checkconfig.InputError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    for line in checkconfig.report(config):
        click.echo(line)
    sys.exit(1 if config.refused else 0)


@main.command()
@click.option("--backend", type=click.Choice(["nft", "legacy"]), default="nft",
              show_default=True, help="iptables backend the nodes use.")
@click.option("--requests", "requests", type=click.IntRange(min=1), default=60,
              show_default=True,
              help="Requests per target; with few, 'every pod answered' is down to luck.")
@click.option("--keep", is_flag=True,
              help="Keep the lab up after the report until Enter or Ctrl-C, to look around.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the results as JSON instead of the text report.")
def lab(backend: str, requests: int, keep: bool, as_json: bool) -> None:
    """Build a two-node cluster of network namespaces, run iptsync on each node, show traffic.

    Needs root. Sends requests to the seed examples' services (ClusterIP, NodePort,
    load-balancer IP), shows which pods answered and which source they saw, prints the dump
    of deploy-svc, and checks it all; exits 1 if a check failed. Everything is torn down on
    exit, Ctrl-C and SIGTERM; the host's own network namespace is never changed.
    """
    from iptsync.lab.demo import run_command  # noqa: PLC0415  (lab code only when used)

    sys.exit(run_command(backend=backend, requests=requests, keep=keep, as_json=as_json))


if __name__ == "__main__":
    main()
