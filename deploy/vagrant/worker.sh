#!/usr/bin/env bash
# A worker: join the cluster with the lab's bootstrap token. Safe to run again.
# Environment: NODE_NAME, CONTROL_PLANE_IP, LAB_TOKEN.
set -euo pipefail
: "${NODE_NAME:?}" "${CONTROL_PLANE_IP:?}" "${LAB_TOKEN:?}"

if [ ! -f /etc/kubernetes/kubelet.conf ]; then
    # Lab only: without CA pinning the worker trusts whatever answers at CONTROL_PLANE_IP on
    # the host-only network. A real cluster passes --discovery-token-ca-cert-hash instead.
    kubeadm join "$CONTROL_PLANE_IP:6443" \
        --node-name "$NODE_NAME" \
        --token "$LAB_TOKEN" \
        --discovery-token-unsafe-skip-ca-verification
fi
