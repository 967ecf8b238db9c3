#!/usr/bin/env bash
# iptsync on the lab, without a registry: the image is built from the checkout on every node
# and handed to containerd directly, under the name deploy/daemonset.yaml uses, so kubelet
# finds it (imagePullPolicy: IfNotPresent) and the lab runs the production manifests as they are.
#
#   deploy.sh image   every node: build Containerfile with buildah, import it into containerd
#   deploy.sh apply   control plane: the API server address for the agents, then
#                     `kubectl apply -k deploy/`, and wait until every agent is ready
#
# Environment: CONTROL_PLANE_IP (apply).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
src=/vagrant
image=$(sed -n 's/^ *image: *//p' "$src/deploy/daemonset.yaml")

build_image() {
    apt-get install -y -qq buildah >/dev/null
    # Host networking for the build's RUN steps: buildah would otherwise attach them to the
    # CNI network it finds in /etc/cni/net.d, which is the pods' network here.
    buildah bud --network host --file "$src/Containerfile" --tag "$image" "$src"
    local dir
    dir=$(mktemp -d)
    buildah push "$image" "docker-archive:$dir/iptsync.tar:$image"
    ctr --namespace k8s.io images import "$dir/iptsync.tar"
    rm -rf "$dir"
}

apply_manifests() {
    : "${CONTROL_PLANE_IP:?}"
    export KUBECONFIG=/etc/kubernetes/admin.conf
    # Without kube-proxy the `kubernetes` Service's cluster IP only works once iptsync has
    # synced, so the agents reach the API server at its real address (deploy/README.md).
    kubectl create namespace iptsync --dry-run=client -o yaml | kubectl apply -f -
    kubectl --namespace iptsync create configmap iptsync-apiserver \
        --from-literal KUBERNETES_SERVICE_HOST="$CONTROL_PLANE_IP" \
        --from-literal KUBERNETES_SERVICE_PORT=6443 \
        --dry-run=client -o yaml | kubectl apply -f -
    kubectl apply -k "$src/deploy"
    kubectl --namespace iptsync rollout status daemonset/iptsync --timeout 5m
}

case "${1:-}" in
    image) build_image ;;
    apply) apply_manifests ;;
    *) echo "usage: $0 image|apply" >&2; exit 2 ;;
esac
