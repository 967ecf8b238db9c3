#!/usr/bin/env bash
# The pod network without a CNI add-on: every node bridges its own pods in a fixed /24 (the
# bridge and host-local plugins from kubernetes-cni) and routes the other nodes' /24s via
# their private IPs. All nodes share one L2 network, so no overlay and no agent is needed,
# and nothing here depends on Services working (which, without kube-proxy, needs iptsync).
# Environment: NODE_NAME, NODE_POD_SUBNET, POD_CIDR, LAB_NODES ("name=ip=subnet ...").
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_POD_SUBNET:?}" "${POD_CIDR:?}" "${LAB_NODES:?}"

mkdir -p /etc/cni/net.d
cat >/etc/cni/net.d/10-lab.conflist <<CONF
{
  "cniVersion": "0.4.0",
  "name": "lab",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "${NODE_POD_SUBNET}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CONF

# Routes to the other nodes' pods, and masquerading for pods talking to the world (not to
# each other: pod-to-pod keeps its source, as with any CNI). Neither survives a reboot by
# itself, so a oneshot unit replays them.
script=/usr/local/sbin/lab-pod-network
{
    echo '#!/bin/sh'
    echo 'set -e'
    for entry in $LAB_NODES; do
        IFS='=' read -r name ip subnet <<<"$entry"
        if [ "$name" != "$NODE_NAME" ]; then
            echo "ip route replace $subnet via $ip"
        fi
    done
    egress="POSTROUTING -s $POD_CIDR ! -d $POD_CIDR -m comment --comment lab-pod-egress -j MASQUERADE"
    echo "iptables -w -t nat -C $egress 2>/dev/null || iptables -w -t nat -A $egress"
} >"$script"
chmod 0755 "$script"

cat >/etc/systemd/system/lab-pod-network.service <<CONF
[Unit]
Description=Routes between the lab nodes' pod subnets, pod egress masquerading
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=$script

[Install]
WantedBy=multi-user.target
CONF
systemctl daemon-reload
systemctl enable --quiet lab-pod-network.service
systemctl restart lab-pod-network.service
