#!/usr/bin/env bash
# Smoke test of the Vagrant lab, run on the host (outside the cluster) after `vagrant up`:
#   1. iptsync is ready on every node and kube-proxy is not deployed
#   2. ClusterIP: answers from every node, spread over all three echo pods
#   3. NodePort: answers from this host on every node's address
#   4. externalTrafficPolicy=Local: answers from this host only on worker1 (the node with the
#      endpoint), the pod sees this host's address (not masqueraded), and the other nodes drop
# Exits non-zero at the first failed check. KEEP=1 keeps the test objects afterwards.
# Needs vagrant and curl on the host; the objects are in deploy/vagrant/smoke-test.yaml.
set -euo pipefail
cd "$(dirname "$0")/../.."

manifest=/vagrant/deploy/vagrant/smoke-test.yaml  # the rsynced checkout, inside the VMs
ns=iptsync-smoke
local_node=worker1  # where echo-local runs (its nodeSelector)

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
ok() { echo "ok:   $*"; }

# A shell command on a lab node, as the vagrant user (who has the admin kubeconfig on cp).
on_node() {
    local node=$1
    shift
    vagrant ssh "$node" --command "$*" | tr -d '\r'
}
kc() { on_node cp "kubectl $(printf '%q ' "$@")"; }

# Run "$@" until it succeeds, at most $1 times, two seconds apart.
retry() {
    local tries=$1 i
    shift
    for ((i = 1; i <= tries; i++)); do
        "$@" && return 0
        sleep 2
    done
    return 1
}

cleanup() {
    if [ "${KEEP:-0}" != 1 ]; then
        kc delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
    fi
}

echo "== the cluster"
kc wait --for=condition=Ready node --all --timeout=300s >/dev/null || fail "nodes not Ready"
if kc --namespace kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    fail "a kube-proxy DaemonSet exists: this lab runs without kube-proxy"
fi
declare -A node_ip=()
while read -r name ip; do
    [ -n "$name" ] && node_ip[$name]=$ip
done < <(kc get nodes -o 'jsonpath={range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
nodes=$(printf '%s\n' "${!node_ip[@]}" | sort)
[ "${#node_ip[@]}" -eq 3 ] || fail "expected 3 nodes, found: $(echo "$nodes" | xargs)"
[ -n "${node_ip[$local_node]:-}" ] || fail "no node named $local_node"
kc --namespace iptsync rollout status daemonset/iptsync --timeout=300s >/dev/null \
    || fail "iptsync DaemonSet not rolled out"
ready=$(kc --namespace iptsync get daemonset iptsync -o 'jsonpath={.status.numberReady}')
[ "$ready" = 3 ] || fail "iptsync ready on $ready of 3 nodes"
ok "3 nodes Ready, iptsync ready on each, no kube-proxy"

echo "== test objects ($ns)"
trap cleanup EXIT
kc apply -f "$manifest" >/dev/null
for deployment in echo echo-local; do
    kc --namespace "$ns" rollout status "deployment/$deployment" --timeout=300s >/dev/null \
        || fail "deployment $deployment not ready"
done
cluster_ip=$(kc --namespace "$ns" get service echo -o 'jsonpath={.spec.clusterIP}')
[ -n "$cluster_ip" ] || fail "service echo has no cluster IP"
ok "echo (3 pods) and echo-local (1 pod on $local_node) ready; echo's cluster IP $cluster_ip"

echo "== ClusterIP from every node"
# Distinct pod names among 30 answers: with 3 endpoints at 1/3 each, missing one has odds 1e-5.
pods_answering() {
    on_node "$1" "for i in \$(seq 30); do curl -s --max-time 2 http://$cluster_ip/hostname; echo; done" \
        | sed '/^$/d' | sort -u
}
all_three_answer() {
    answered=$(pods_answering "$1")
    [ "$(grep -c . <<<"$answered")" -eq 3 ]
}
for node in $nodes; do
    retry 15 all_three_answer "$node" \
        || fail "$cluster_ip:80 from $node: answers from $(echo "$answered" | xargs), not 3 pods"
    ok "$cluster_ip:80 from $node: $(echo "$answered" | xargs)"
done

echo "== NodePort 30080 from this host, on every node"
for node in $nodes; do
    url="http://${node_ip[$node]}:30080/hostname"
    pod=$(retry 15 curl -fsS --max-time 3 "$url") || fail "$url ($node) does not answer"
    ok "$url ($node) answered by $pod"
done

echo "== externalTrafficPolicy=Local NodePort 30081 from this host"
url="http://${node_ip[$local_node]}:30081/clientip"
client=$(retry 15 curl -fsS --max-time 3 "$url") || fail "$url ($local_node) does not answer"
client_ip=${client%:*}
for node in $nodes; do
    [ "$client_ip" != "${node_ip[$node]}" ] || fail "$url: the pod saw $node's address: masqueraded"
done
[[ $client_ip != 10.244.* ]] || fail "$url: the pod saw $client_ip, a pod network address: masqueraded"
ok "$url ($local_node, has the endpoint) answered; the pod saw the client as $client_ip"
for node in $nodes; do
    [ "$node" != "$local_node" ] || continue
    url="http://${node_ip[$node]}:30081/clientip"
    rc=0
    curl -fsS --max-time 3 "$url" >/dev/null 2>&1 || rc=$?
    # 28: timed out, i.e. dropped, as kube-proxy drops it ("has no local endpoints").
    [ "$rc" -eq 28 ] || fail "$url ($node, no endpoint): expected a drop (curl exit 28), got exit $rc"
    ok "$url ($node, no endpoint): dropped"
done

echo "PASS: ClusterIP, NodePort and externalTrafficPolicy=Local work through iptsync"
