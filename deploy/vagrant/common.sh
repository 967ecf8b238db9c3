#!/usr/bin/env bash
# Every lab node: swap off, the kernel settings Kubernetes needs, containerd, and kubeadm,
# kubelet and kubectl from the Kubernetes apt repository (pkgs.k8s.io). Safe to run again
# (`vagrant provision`).
# Environment (set by the Vagrantfile): K8S_MINOR (e.g. v1.31), NODE_IP.
set -euo pipefail
: "${K8S_MINOR:?}" "${NODE_IP:?}"
export DEBIAN_FRONTEND=noninteractive

swapoff -a
sed -i -E '/^[^#].*[[:space:]]swap[[:space:]]/s/^/#/' /etc/fstab

cat >/etc/modules-load.d/kubernetes.conf <<'CONF'
overlay
br_netfilter
CONF
modprobe overlay
modprobe br_netfilter

# iptsync's container is not privileged, so its /proc/sys is read-only: the sysctls kube-proxy
# would set at start-up are set (and kept across reboots) here. route_localnet=1 is what
# NodePorts on 127.0.0.1 need (iptables.localhostNodePorts in deploy/configmap.yaml).
cat >/etc/sysctl.d/90-kubernetes.conf <<'CONF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.ipv4.conf.all.route_localnet = 1
CONF
sysctl --quiet --system

apt-get update -qq
apt-get install -y -qq apt-transport-https ca-certificates curl gpg \
    containerd iptables conntrack >/dev/null

keyring=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
repo="https://pkgs.k8s.io/core:/stable:/${K8S_MINOR}/deb/"
mkdir -p /etc/apt/keyrings
curl -fsSL "${repo}Release.key" | gpg --dearmor --yes -o "$keyring"
echo "deb [signed-by=$keyring] $repo /" >/etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt-get install -y -qq kubelet kubeadm kubectl kubernetes-cni >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# containerd must agree with kubelet (systemd cgroup driver, kubeadm's default) and with
# kubeadm (its pause image); the CNI plugins come from kubernetes-cni in /opt/cni/bin
# (Debian's containerd looks in /usr/lib/cni by default).
pause_image=$(kubeadm config images list --kubernetes-version "$(kubeadm version -o short)" \
    | grep /pause:)
mkdir -p /etc/containerd
containerd config default \
    | sed -e 's/SystemdCgroup = false/SystemdCgroup = true/' \
          -e "s|sandbox_image = .*|sandbox_image = \"$pause_image\"|" \
          -e 's|bin_dir = .*|bin_dir = "/opt/cni/bin"|' \
          -e 's|conf_dir = .*|conf_dir = "/etc/cni/net.d"|' \
    >/etc/containerd/config.toml
systemctl restart containerd
printf 'runtime-endpoint: unix:///run/containerd/containerd.sock\n' >/etc/crictl.yaml

# The private network is the node's address, not the NAT interface every VM shares.
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" >/etc/default/kubelet
systemctl enable --quiet kubelet
# kubelet restarts in a loop until kubeadm init or join writes its configuration.
systemctl restart kubelet
