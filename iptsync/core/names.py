"""Chain names, identical to kube-proxy's so a migrating node keeps its chains.

Per-service chains are a prefix plus the first 16 characters of
base32(sha256(servicePortName + protocol)); endpoint chains hash the endpoint's ``ip:port`` in
as well. One predicate, :func:`is_owned_chain`, decides which chains iptsync may rewrite or
delete; nothing else is ever touched.
"""

from __future__ import annotations

import hashlib

# Top-level chains, filled in on every full sync.
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
# Shared with kubelet, which creates an identical copy: rewritten but never deleted.
KUBE_FIREWALL = "KUBE-FIREWALL"

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX)

TOP_LEVEL_CHAINS = {
    "filter": (KUBE_NODEPORTS, KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD,
               KUBE_PROXY_FIREWALL, KUBE_PROXY_CANARY),
    "nat": (KUBE_NODEPORTS, KUBE_SERVICES, KUBE_POSTROUTING, KUBE_MARK_MASQ, KUBE_PROXY_CANARY),
}
SHARED_CHAINS = {"filter": (KUBE_FIREWALL,)}
# The top-level chains that hold services' rules (the rest hold fixed rules only).
SERVICE_RULE_CHAINS = {
    "filter": (KUBE_NODEPORTS, KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_PROXY_FIREWALL),
    "nat": (KUBE_NODEPORTS, KUBE_SERVICES),
}


_B32_PAIRS = [a + b for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
              for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"]


def _hash(text: str) -> str:
    """The first 16 characters of base32(sha256(text)), i.e. its first 80 bits.

    Encoded ten bits at a time: base64.b32encode is pure Python and, at 100k endpoints,
    this is a tenth of a large cluster's render time.
    """
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return (p[n >> 70] + p[n >> 60 & 1023] + p[n >> 50 & 1023] + p[n >> 40 & 1023]
            + p[n >> 30 & 1023] + p[n >> 20 & 1023] + p[n >> 10 & 1023] + p[n & 1023])


def port_hash(service_port_name: str, protocol: str) -> str:
    """The 16-character hash shared by a service port's SVC/SVL/EXT/FW chains."""
    return _hash(service_port_name + protocol)


def svc_chain(service_port_name: str, protocol: str) -> str:
    return SVC_PREFIX + port_hash(service_port_name, protocol)


def svl_chain(service_port_name: str, protocol: str) -> str:
    return SVL_PREFIX + port_hash(service_port_name, protocol)


def ext_chain(service_port_name: str, protocol: str) -> str:
    return EXT_PREFIX + port_hash(service_port_name, protocol)


def fw_chain(service_port_name: str, protocol: str) -> str:
    return FW_PREFIX + port_hash(service_port_name, protocol)


def sep_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """The endpoint chain; ``endpoint`` is ``ip:port``."""
    return SEP_PREFIX + _hash(service_port_name + protocol + endpoint)


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def is_owned_chain(table: str, chain: str) -> bool:
    """True for chains iptsync may flush, rewrite or (if not shared) delete in ``table``."""
    return (is_service_chain(chain) and table == "nat") or chain in TOP_LEVEL_CHAINS.get(
        table, ()) or chain in SHARED_CHAINS.get(table, ())


def is_deletable_chain(table: str, chain: str) -> bool:
    """Owned chains that cleanup may delete; kubelet's shared chains stay."""
    return is_owned_chain(table, chain) and chain not in SHARED_CHAINS.get(table, ())
