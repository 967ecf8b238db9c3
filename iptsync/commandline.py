"""kube-proxy's flags as click options, generated from the table of :mod:`iptsync.kubeproxy`.

Each flag (and alias) of the table becomes an option that keeps the raw text given (None or
an empty tuple when absent): :func:`kube_proxy_flags` hands them, in the table's order, to
:func:`iptsync.options.resolve`. Boolean flags take Go's forms (``--masquerade-all``,
``--masquerade-all=false``). :class:`KubeProxyCommand` rewrites what click cannot read as
kube-proxy (pflag) does: ``-v=2``, ``-v 2`` and ``-v2`` are ``--v=2`` (a bare ``-v`` or
``-vv`` stays iptsync's own verbosity count), and ``--no-iptables-localhost-nodeports``
(iptsync's older spelling) is ``--iptables-localhost-nodeports=false``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from iptsync.kubeproxy import BOOL, BY_FLAG, OPTIONS, OptionError, normalize_args
from iptsync.options import ProxyConfig, load_document, resolve

F = TypeVar("F", bound=Callable[..., Any])
_PREFIX = "kp_"


def _dest(name: str) -> str:
    return _PREFIX + name.replace("-", "_")


def kube_proxy_options(func: F) -> F:
    """Every flag of kube-proxy's command line, as options of the decorated command (the
    ones iptsync ignores are hidden from --help; docs/comparison.md lists them all)."""
    for option in reversed(OPTIONS):
        if option.flag is None:
            continue
        for name in reversed((option.flag, *option.aliases)):
            extra: dict[str, Any] = ({"is_flag": False, "flag_value": "true"}
                                     if option.kind is BOOL else {})
            func = click.option(
                f"--{name}", _dest(name), default=None, multiple=option.kind.repeated,
                hidden=not option.applied, metavar=option.kind.name.upper(),
                help=f"{option.note} [kube-proxy's default: "
                     f"{option.kind.show(option.default)}]" if option.flag == name
                else f"Alias of --{option.flag}.", **extra)(func)
    return func


def kube_proxy_flags(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """The kube-proxy flags given (name without dashes, raw value), taken out of ``params``."""
    given = []
    for name in BY_FLAG:
        raw = params.pop(_dest(name), None)
        if raw is not None and raw != ():
            given.append((name, list(raw) if isinstance(raw, tuple) else raw))
    return given


def proxy_config(params: dict[str, Any]) -> ProxyConfig:
    """The configuration in effect for a command's flags and --config file; every refused
    flag or field stops the command with a usage error naming it."""
    flags = kube_proxy_flags(params)
    path = next((raw for name, raw in flags if name == "config"), None)
    try:
        document = load_document(path) if path else None
    except OptionError as err:
        raise click.UsageError(str(err)) from None
    config = resolve(flags, document, f"--config {path}")
    if config.refused:
        raise click.UsageError("\n".join(verdict.reason for verdict in config.refused))
    return config


def log_verdicts(config: ProxyConfig, path: str | None) -> None:
    """One line per flag or field given that iptsync ignores (at its default: none): INFO
    for kube-proxy's settings of no use here, WARNING for what looks like a mistake (a flag
    --config makes kube-proxy ignore, a field kube-proxy does not know)."""
    log = logging.getLogger("iptsync")
    for verdict in config.verdicts:
        if verdict.handling != "ignored" or verdict.default:
            continue
        where = "" if verdict.name.startswith("--") else f"--config {path}: "
        level = logging.WARNING if verdict.suspicious else logging.INFO
        log.log(level, "%s%s=%s is ignored: %s", where, verdict.name, verdict.value,
                verdict.reason)


def klog_verbosity(level: int) -> int:
    """kube-proxy's ``--v`` as iptsync's verbosity count: up to 3 info (what a node agent
    logs), 4 and 5 iptsync's debug lines, 6 and more the libraries' debug output too."""
    return 1 if level < 4 else 2 if level < 6 else 3


class KubeProxyCommand(click.Command):
    """A command that reads kube-proxy's spellings click would not (see the module)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, normalize_args(args))
