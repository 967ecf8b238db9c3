"""Synthetic clusters for benchmarks: N services x M endpoints, mixed types.

Deterministic for a given (services, endpoints, seed). Every 10th service is a NodePort,
every 20th a LoadBalancer with an ingress IP, every 50th has ETP=Local, every 25th uses
ClientIP affinity; endpoints are spread over 20 nodes, a tenth of them on ``node1``.

    python -m bench.generate --services 10000 --endpoints 10 > /tmp/cluster.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any


def service_objects(index: int, endpoints: int, rng: random.Random) -> list[dict[str, Any]]:
    name = f"svc-{index:05d}"
    namespace = f"ns-{index % 100:02d}"
    spec: dict[str, Any] = {
        "clusterIP": f"10.96.{index // 250}.{index % 250 + 1}",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    }
    status: dict[str, Any] = {}
    if index % 10 == 0:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = 30000 + index % 2768
    if index % 20 == 0:
        spec["type"] = "LoadBalancer"
        lb_ip = f"203.0.{index // 250 % 250}.{index % 250 + 1}"
        status = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    if index % 50 == 0 and spec.get("type"):
        spec["externalTrafficPolicy"] = "Local"
        spec["healthCheckNodePort"] = 32000 + index % 700
    if index % 25 == 0:
        spec["sessionAffinity"] = "ClientIP"
    eps = []
    for j in range(endpoints):
        n = index * endpoints + j
        ip = f"10.{1 + n // 65000 % 200}.{n // 250 % 250}.{n % 250 + 1}"
        node = "node1" if rng.random() < 0.1 else f"node{rng.randint(2, 20)}"
        eps.append({"addresses": [ip], "nodeName": node, "conditions": {"ready": True}})
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace}, "spec": spec, "status": status},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-abcde", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": eps},
    ]


def cluster(services: int, endpoints: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    items = [obj for i in range(services) for obj in service_objects(i, endpoints, rng)]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    json.dump(cluster(args.services, args.endpoints, args.seed), sys.stdout)


if __name__ == "__main__":
    main()
