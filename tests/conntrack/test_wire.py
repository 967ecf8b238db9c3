"""The ctnetlink messages iptsync packs itself read back as pyroute2's codec reads them."""

from __future__ import annotations

import socket

from pyroute2.netlink.nfnetlink.nfctsocket import (
    FILTER_FLAG_CTA_IP_DST,
    FILTER_FLAG_CTA_PROTO_DST_PORT,
    FILTER_FLAG_CTA_PROTO_NUM,
    nfct_msg,
)

from iptsync.core.flows import UDP, FlowQuery
from iptsync.core.model import IPFamily
from iptsync.kernel.conntrack import dump_request


def decoded(data: bytes) -> nfct_msg:
    msg = nfct_msg(data)
    msg.decode()
    return msg


def test_a_dump_request_names_the_address_port_and_protocol_it_filters_on() -> None:
    """An IPv4 query by address and port is a dump of family AF_INET whose original tuple
    and CTA_FILTER flags name exactly the address, the protocol and the port."""
    msg = decoded(dump_request(IPFamily.IPV4, FlowQuery(UDP, "10.96.0.10", 53)))
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    proto = orig.get_attr("CTA_TUPLE_PROTO")
    assert (socket.AF_INET, "10.96.0.10", UDP, 53) == (
        msg["nfgen_family"], orig.get_attr("CTA_TUPLE_IP").get_attr("CTA_IP_V4_DST"),
        proto.get_attr("CTA_PROTO_NUM"), proto.get_attr("CTA_PROTO_DST_PORT"))
    assert (FILTER_FLAG_CTA_IP_DST | FILTER_FLAG_CTA_PROTO_NUM
            | FILTER_FLAG_CTA_PROTO_DST_PORT) == msg.get_attr("CTA_FILTER").get_attr(
                "CTA_FILTER_ORIG_FLAGS")


def test_an_ipv6_port_query_and_a_plain_dump_name_no_address() -> None:
    """A query by port alone carries no address; no query, no filter at all."""
    msg = decoded(dump_request(IPFamily.IPV6, FlowQuery(UDP, None, 30053)))
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    assert (socket.AF_INET6, None, 30053) == (
        msg["nfgen_family"], orig.get_attr("CTA_TUPLE_IP"),
        orig.get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_DST_PORT"))
    assert FILTER_FLAG_CTA_PROTO_NUM | FILTER_FLAG_CTA_PROTO_DST_PORT == msg.get_attr(
        "CTA_FILTER").get_attr("CTA_FILTER_ORIG_FLAGS")
    plain = decoded(dump_request(IPFamily.IPV4, None))
    assert (None, None) == (plain.get_attr("CTA_TUPLE_ORIG"), plain.get_attr("CTA_FILTER"))
