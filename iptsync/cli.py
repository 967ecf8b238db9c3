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
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

import click

from iptsync.agent.health import (
    HealthServer,
    HealthState,
    HttpServer,
    MetricsServer,
    ServiceHealthServers,
    parse_bind_address,
)
from iptsync.agent.loop import Agent, Timing
from iptsync.agent.metrics import Metrics
from iptsync.core.model import Problem
from iptsync.core.plan import cleanup_plan
from iptsync.core.policy import Settings
from iptsync.core.ruleset import RulesetError
from iptsync.engine.apply import STAGE_LINES, SyncError, apply_plan
from iptsync.engine.desired import Desired, desired_from_objects, report
from iptsync.engine.reconciler import Engine, bulk
from iptsync.kernel.conntrack import clear_stale_flows
from iptsync.kernel.netfilter import Netfilter, detect_backend
from iptsync.kernel.nodeinfo import interface_addresses
from iptsync.kernel.port import Backend, NetfilterError
from iptsync.kernel.sysctl import ensure_proxy_sysctls
from iptsync.kernel.watch import ChangeWatch
from iptsync.logs import setup_logging
from iptsync.options import (
    OptionError,
    ProxyConfig,
    build_settings,
    parse_duration,
    parse_ips,
    read_config,
)
from iptsync.sources.base import Source
from iptsync.sources.files import LoadedObjects, load_objects

F = TypeVar("F", bound=Callable[..., Any])


def node_options(func: F) -> F:
    """The flags that say which node this is and how its rules are shaped."""
    decorators = [
        click.option("--objects", "objects", multiple=True, type=click.Path(exists=True),
                     help="Manifest file or directory (YAML/JSON, multi-document, kind: List)."),
        click.option("--config", "config", default=None, type=click.Path(exists=True),
                     help="A KubeProxyConfiguration YAML file; flags given win over it."),
        click.option("--hostname-override", default=None,
                     help="This node's name, as in the Node object (default: hostname)."),
        click.option("--cluster-cidr", default=None,
                     help="Pod CIDR of the cluster; traffic from outside it is masqueraded."),
        click.option("--masquerade-all", is_flag=True, help="Masquerade all service traffic."),
        click.option("--iptables-masquerade-bit", "masquerade_bit", default=14, type=int,
                     show_default=True, help="fwmark bit marking packets to masquerade."),
        click.option("--nodeport-addresses", default=None,
                     help="CIDRs of node addresses that accept NodePorts (default: all)."),
        click.option("--iptables-localhost-nodeports/--no-iptables-localhost-nodeports",
                     "localhost_nodeports", default=True, show_default=True,
                     help="Accept NodePort connections on 127.0.0.1."),
        click.option("--node-ip", "node_ips", multiple=True,
                     help="A node address (repeatable); default: the Node object's addresses."),
        click.option("-v", "--verbose", count=True,
                     help="More logging: -v info, -vv debug, -vvv libraries' debug too "
                          "(run starts at info: one v fewer)."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def proxy_config(params: dict[str, Any]) -> ProxyConfig:
    """The --config file's fields (empty without one); warns about each one not applied."""
    try:
        config = read_config(params["config"]) if params.get("config") else ProxyConfig()
    except OptionError as err:
        raise click.UsageError(str(err)) from None
    for field in config.ignored:
        logging.getLogger("iptsync").warning(
            "--config %s: %s is set but not supported by iptsync: ignored", params["config"],
            field)
    return config


def explicit(name: str) -> bool:
    """Whether the flag behind parameter ``name`` was given (not left at its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def settings_from(params: dict[str, Any], config: ProxyConfig | None = None) -> Settings:
    config = proxy_config(params) if config is None else config

    def pick(name: str, configured: Any) -> Any:
        return params[name] if explicit(name) or configured is None else configured

    try:
        return build_settings(
            node_name=params["hostname_override"] or config.hostname_override
            or socket.gethostname(),
            cluster_cidr=params["cluster_cidr"] or config.cluster_cidr,
            masquerade_all=pick("masquerade_all", config.masquerade_all),
            masquerade_bit=pick("masquerade_bit", config.masquerade_bit),
            nodeport_addresses=params["nodeport_addresses"] or config.nodeport_addresses,
            node_ips=parse_ips(params["node_ips"], "--node-ip"),
            localhost_nodeports=pick("localhost_nodeports", config.localhost_nodeports),
        )
    except OptionError as err:
        raise click.UsageError(str(err)) from None


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
                        interface_ips: Iterable[Any] = ()) -> Desired:
    """The rules for ``--objects`` and the node flags; every problem logged and kept in
    :attr:`Desired.problems`, the input's first."""
    settings = settings_from(params)
    loaded = load_checked(params["objects"], as_json=as_json)
    desired = desired_from_objects(loaded.objects, settings, interface_ips)
    desired.problems = [*loaded.problems, *desired.problems]
    report(desired.problems)
    return desired


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


@main.command()
@node_options
@click.option("--format", "output_format", type=click.Choice(["restore", "json"]),
              default="restore", show_default=True, help="iptables-restore text or JSON.")
def dump(output_format: str, **params: Any) -> None:
    """Print the rules a full sync would write (iptables-restore input). Needs no root."""
    # A short-lived process building a few million objects: the cyclic collector would
    # rescan them again and again for nothing (a third of the time at 10k services).
    gc.disable()
    setup_logging(params.pop("verbose"))
    desired = desired_from_params(params, as_json=output_format == "json")
    if output_format == "json":
        print_json(dump_json(desired))
    else:
        sys.stdout.write(desired.payload())


def dump_json(desired: Desired) -> dict[str, Any]:
    """A machine-readable dump: tables, chains, rules (restore and canonical form), jumps."""
    return {
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


@main.command()
@node_options
@backend_option("auto")
@click.option("--kubeconfig", default=None, type=click.Path(exists=True),
              help="kubeconfig of the API server (default: in-cluster config).")
@click.option("--once", is_flag=True, help="Sync this network namespace once and exit.")
@click.option("--min-sync-period", default=None,
              help="Least time between syncs; a change after a quiet period is applied at "
                   "once.  [default: 1s]")
@click.option("--sync-period", default=None,
              help="Time between full syncs (read the kernel, repair drift).  [default: 30s]")
@click.option("--healthz-bind-address", default=None,
              help="HOST:PORT of /healthz and /livez; empty disables.  [default: 0.0.0.0:10256]")
@click.option("--metrics-bind-address", default=None,
              help="HOST:PORT of /metrics; empty disables.  [default: 127.0.0.1:10249]")
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
              help="Do not delete stale UDP/SCTP conntrack entries after syncs.")
def run(backend: str, kubeconfig: str | None, once: bool, log_format: str,
        no_conntrack_cleanup: bool, **params: Any) -> None:
    """Keep the node's iptables rules in sync with the Services and EndpointSlices.

    Watches the API (in-cluster config, or --kubeconfig) or --objects files. With --once,
    syncs once and exits.
    """
    setup_logging(params.pop("verbose") + 1, log_format)
    config = proxy_config(params)
    settings = settings_from(params, config)
    ensure_proxy_sysctls(settings.nodeports_on_localhost)
    netfilter = Netfilter(resolve_backend(backend))
    try:
        progress_interval = parse_duration(params["progress_interval"], "--progress-interval")
    except OptionError as err:
        raise click.UsageError(str(err)) from None
    engine = Engine(netfilter, settings, interface_ips=interface_addresses(),
                    flows=None if no_conntrack_cleanup else clear_stale_flows,
                    stage_lines=STAGE_LINES[netfilter.backend],
                    progress_interval=progress_interval,
                    watch=None if once else open_change_watch(netfilter))
    if once:
        if not params["objects"]:
            raise click.UsageError("--once needs --objects")
        sys.exit(run_once(engine, params["objects"]))
    try:
        timing = Timing(
            min_sync_period=parse_duration(
                params["min_sync_period"] or config.min_sync_period or 1.0,
                "--min-sync-period"),
            sync_period=parse_duration(params["sync_period"] or config.sync_period or 30.0,
                                       "--sync-period"),
            canary_interval=parse_duration(params["canary_interval"], "--canary-interval"),
            full_sync_period=parse_duration(params["full_sync_period"], "--full-sync-period"))
        healthz = bind_address(params["healthz_bind_address"], config.healthz_bind_address,
                               "0.0.0.0:10256", "--healthz-bind-address")
        metrics_at = bind_address(params["metrics_bind_address"], config.metrics_bind_address,
                                  "127.0.0.1:10249", "--metrics-bind-address")
    except (OptionError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    run_agent(engine, make_sources(params["objects"], kubeconfig, settings.node_name),
              timing, healthz, metrics_at)


def open_change_watch(netfilter: Netfilter) -> ChangeWatch | None:
    """The backend's change watch; without one, everything is compared every sync period."""
    try:
        return netfilter.change_watch()
    except OSError as err:
        logging.getLogger("iptsync").warning(
            "cannot watch the kernel for changes by other programs (%s); comparing every "
            "rule every sync period instead", err)
        return None


def bind_address(flag: str | None, configured: str | None, default: str,
                 what: str) -> tuple[str, int] | None:
    text = flag if flag is not None else configured if configured is not None else default
    return parse_bind_address(text, what) if text else None


def run_once(engine: Engine, paths: tuple[str, ...]) -> int:
    # The live tables are read while the manifests load and render: on a node holding
    # every rule (a restart), iptables-save takes about as long as all of that.
    engine.read_ahead()
    loaded = load_checked(paths)
    report(loaded.problems)
    with bulk():
        for obj in loaded.objects:
            engine.upsert(obj)
    del loaded  # the manifests (90 MB at 10k services) are not needed for the sync
    try:
        result = engine.sync(full=True)
    except (SyncError, NetfilterError, RulesetError) as err:
        logging.getLogger("iptsync").error("%s", err)
        return 1
    logging.getLogger("iptsync").info("%s", result.line())
    return 0


def make_sources(objects: tuple[str, ...], kubeconfig: str | None,
                 node_name: str) -> list[Source]:
    if objects:
        from iptsync.sources.files import FilesSource  # noqa: PLC0415

        return [FilesSource(objects)]
    from iptsync.sources.api import ApiConfigError, ApiSource  # noqa: PLC0415  (slow import)

    try:
        return [ApiSource(node_name, kubeconfig=kubeconfig)]
    except ApiConfigError as err:
        raise click.ClickException(f"cannot reach the API server: {err}") from None


def run_agent(engine: Engine, sources: list[Source], timing: Timing,
              healthz: tuple[str, int] | None, metrics_at: tuple[str, int] | None) -> None:
    """Serve health and metrics, run the loop until SIGTERM or SIGINT; rules stay in place."""
    metrics = Metrics()
    health = HealthState(2 * timing.sync_period)
    servers: list[HttpServer] = []
    wanted: list[tuple[str, tuple[str, int] | None, Callable[[tuple[str, int]], HttpServer]]] = [
        ("--healthz-bind-address", healthz, lambda at: HealthServer(at, health)),
        ("--metrics-bind-address", metrics_at,
         lambda at: MetricsServer(at, metrics.registry, health))]
    for flag, address, serve in wanted:
        if address is None:
            continue
        try:
            servers.append(serve(address))
        except OSError as err:
            for server in servers:
                server.close()
            host, port = address
            raise click.ClickException(
                f"{flag} {host or '0.0.0.0'}:{port}: cannot listen there: "
                f"{err.strerror or err} (another process, or another iptsync or kube-proxy, "
                f"may hold the port; choose another address or an empty one to disable "
                f"it)") from None
    agent = Agent(engine, sources, timing=timing, metrics=metrics, health=health,
                  service_health=ServiceHealthServers(proxy_healthy=health.healthy))

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("iptsync").info("received %s, stopping",
                                          signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("iptsync").info(
        "starting on node %s (%s backend); min sync period %.1fs, sync period %.1fs",
        engine.settings.node_name, engine.netfilter.backend.value if engine.netfilter else "-",
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
    """Remove every chain and jump rule iptsync (or kube-proxy) owns; leave everything else."""
    setup_logging(verbose + 1)
    backends = list(Backend) if backend == "both" else [resolve_backend(backend)]
    failed = False
    for chosen in backends:
        netfilter = Netfilter(chosen)
        try:
            plan = cleanup_plan(netfilter.save())
            apply_plan(netfilter, plan)
        except (SyncError, NetfilterError, RulesetError, FileNotFoundError) as err:
            logging.getLogger("iptsync").error("cleanup (%s): %s", chosen.value, err)
            failed = True
            continue
        logging.getLogger("iptsync").info("cleanup (%s): %s", chosen.value, plan.summary())
    if failed:
        sys.exit(1)


@main.command()
@node_options
@backend_option("auto")
@click.option("--src", required=True, help="Source IP of the connection.")
@click.option("--dst", required=True, help="Destination IP:PORT (service, node or LB IP).")
@click.option("--proto", type=click.Choice(["tcp", "udp", "sctp"]), default="tcp",
              show_default=True, help="Protocol.")
@click.option("--from", "origin", type=click.Choice(["pod", "node", "external"]),
              default=None, help="Where the packet enters: a pod, the node itself, outside "
              "(default: node for a node address, pod inside --cluster-cidr, else external).")
@click.option("--live", is_flag=True,
              help="Trace the rules netfilter holds now in this network namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def trace(*, backend: str, src: str, dst: str, proto: str, origin: str | None, live: bool,
          as_json: bool, **params: Any) -> None:
    """Trace a new connection through the rules: endpoints and odds, masquerade, or where it
    is dropped or rejected, with the rules that decided it. --live reads this namespace's
    rules (root); --objects renders them from manifests (no root)."""
    from iptsync.inspection import trace as tracer  # noqa: PLC0415  (keeps this command's imports local)

    setup_logging(params.pop("verbose"))
    if live == bool(params["objects"]):
        raise click.UsageError("give either --live or --objects")
    settings = settings_from(params)
    problems: list[Problem] = []
    try:
        packet = tracer.make_packet(src, dst, proto)
        if live:
            tables = tracer.from_saved(Netfilter(resolve_backend(backend)).save(("filter", "nat")))
            node_ips = tuple(dict.fromkeys((*settings.node_ips, *interface_addresses())))
        else:
            desired = desired_from_params(params, as_json=as_json)
            tables, node_ips = tracer.from_desired(desired.tables), desired.settings.node_ips
            problems = desired.problems
    except tracer.TraceError as err:
        raise click.UsageError(str(err)) from None
    except (NetfilterError, FileNotFoundError) as err:
        raise click.ClickException(f"cannot read the live rules: {err}") from None
    chosen = origin or tracer.default_origin(packet.src, settings.cluster_cidrs, node_ips)
    result = tracer.trace(tables, packet, origin=chosen, node_ips=node_ips)
    if as_json:
        print_json({**tracer.result_json(result), "problems": problems_json(problems)})
    else:
        sys.stdout.write(tracer.render_text(result))


@main.command()
@node_options
@click.argument("service")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def explain(*, service: str, as_json: bool, **params: Any) -> None:
    """Explain SERVICE (namespace/name[:port], port by name; without it, every port).

    For each node role (this node, each node running endpoints, any other node), each entry
    point (cluster IP, external and load-balancer IPs, NodePort) and each kind of client
    (pods, the node, outside): which endpoints get the traffic and with what probability,
    whether it is masqueraded, or why it is rejected or dropped, and why each endpoint left
    out is left out. Reads --objects; needs no root.
    """
    from iptsync.inspection import explain as explainer  # noqa: PLC0415  (keeps this command's imports local)

    setup_logging(params.pop("verbose"))
    if not params["objects"]:
        raise click.UsageError("--objects is required")
    try:
        ref = explainer.parse_service_ref(service)
    except explainer.ExplainError as err:
        raise click.UsageError(str(err)) from None
    desired = desired_from_params(params, as_json=as_json)
    try:
        result = explainer.explain(desired.state, desired.settings, ref)
    except explainer.ExplainError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        print_json({**explainer.explanation_json(result),
                    "problems": problems_json(desired.problems)})
    else:
        sys.stdout.write(explainer.render_text(result))


@main.command()
@node_options
@backend_option("auto")
@click.option("--live", is_flag=True,
              help="Compare with the rules netfilter holds now in this network namespace.")
@click.option("--saved", type=click.File("r"), default=None,
              help="Compare with an iptables-save file instead (- for stdin).")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def diff(*, backend: str, live: bool, saved: IO[str] | None, as_json: bool,
         **params: Any) -> None:
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
    try:
        if saved is not None:
            current, label, interface_ips = parse_save(saved.read()), f"rules in {saved.name}", []
        else:
            netfilter = Netfilter(resolve_backend(backend))
            current, label = netfilter.save(), f"live rules ({netfilter.backend.value})"
            interface_ips = interface_addresses()  # as `iptsync run` renders for this node
    except (NetfilterError, RulesetError, OSError) as err:
        click.echo(f"Error: cannot read the rules: {err}", err=True)
        sys.exit(2)
    try:
        desired = desired_from_params(params, as_json=as_json, interface_ips=interface_ips)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    changes = diffview.diff_report(make_plan(desired.tables, current), current,
                                   desired.tables)
    if as_json:
        print_json({**diffview.report_json(changes),
                    "problems": problems_json(desired.problems)})
    else:
        sys.stdout.write(diffview.render_text(
            changes, live_label=label,
            desired_label=f"the rules a sync for {desired.settings.node_name} writes"))
    sys.exit(1 if changes.changed else 0)


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
