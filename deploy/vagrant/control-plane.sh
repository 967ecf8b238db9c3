#!/usr/bin/env bash
# The control plane: kubeadm init without the kube-proxy add-on (iptsync takes its place), with
# the bootstrap token the Vagrantfile made, so the workers can join with it. Safe to run again.
# Environment: NODE_NAME, NODE_IP, POD_CIDR, LAB_TOKEN.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${POD_CIDR:?}" "${LAB_TOKEN:?}"

if [ ! -f /etc/kubernetes/admin.conf ]; then
    kubeadm init \
        --node-name "$NODE_NAME" \
        --apiserver-advertise-address "$NODE_IP" \
        --pod-network-cidr "$POD_CIDR" \
        --token "$LAB_TOKEN" \
        --token-ttl 0 \
        --skip-phases addon/kube-proxy
fi

for home in /root /home/vagrant; do
    install -d -m 0700 "$home/.kube"
    install -m 0600 /etc/kubernetes/admin.conf "$home/.kube/config"
done
chown -R vagrant:vagrant /home/vagrant/.kube
