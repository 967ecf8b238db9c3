"""``iptsync check-config``: what iptsync does with each flag and field of a kube-proxy
DaemonSet, static Pod, ConfigMap or argument list; exit 1 when something would be refused, 2
when the input cannot be read. Runs the command as a process (no root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from iptsync import checkconfig

FIXTURES = Path(__file__).with_name("fixtures")


def check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iptsync.cli", "check-config", *args],
                          capture_output=True, text=True, check=False, timeout=60,
                          input=stdin)


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def test_kubeadm_daemonset_and_configmap_are_all_same_or_ignored() -> None:
    """kubeadm's pair: the flags and the mounted config.conf are read; nothing is refused;
    each line says what iptsync does."""
    result = check("-f", fixture("kubeadm-daemonset.yaml"), "-f",
                   fixture("kubeadm-configmap.yaml"))
    assert 0 == result.returncode, result.stderr
    lines = result.stdout.splitlines()
    assert "same     --config=/var/lib/kube-proxy/config.conf: reads this " \
           "KubeProxyConfiguration file; other flags are then ignored, as by kube-proxy " \
           "(but --hostname-override, --master and the logging flags). A change to the file " \
           "is read at the next start (kube-proxy exits on one)" in lines
    assert "same     clientConnection.kubeconfig: /var/lib/kube-proxy/kubeconfig.conf: the " \
           "kubeconfig of the API server connection; empty: the pod's service account" in lines
    assert "ignored  ipvs.scheduler: \"\" (kube-proxy's default): only used in ipvs mode, " \
           "which iptsync does not implement" in lines
    assert "27 same, 29 ignored, 0 refused" == lines[-1]


def test_a_configmap_alone_is_read_from_config_conf() -> None:
    """The ConfigMap on its own (kubeadm's key config.conf), also from standard input."""
    text = (FIXTURES / "kubeadm-configmap.yaml").read_text()
    result = check("-f", "-", stdin=text)
    assert 0 == result.returncode, result.stderr
    assert "same     clusterCIDR: 10.244.0.0/16: the pods' CIDR (one per IP family, " \
           "comma-separated): traffic from outside it is masqueraded (detect-local-mode " \
           "ClusterCIDR)" in result.stdout.splitlines()


def test_gke_shell_line_gives_kube_proxys_arguments() -> None:
    """From ``sh -c "exec kube-proxy ... 1>>log 2>&1"``: the arguments after the binary,
    without the redirections."""
    objects = checkconfig.documents((FIXTURES / "gke-kube-proxy-pod.yaml").read_text(), "gke")
    assert ["--master=https://34.71.104.106", "--kubeconfig=/var/lib/kube-proxy/kubeconfig",
            "--cluster-cidr=10.8.0.0/14", "--oom-score-adj=-998", "--v=2",
            "--feature-gates=DynamicKubeletConfig=false,RotateKubeletServerCertificate=true,"
            "ExecProbeTimeout=false", "--iptables-sync-period=1m",
            "--iptables-min-sync-period=10s", "--ipvs-sync-period=1m",
            "--ipvs-min-sync-period=10s", "--detect-local-mode=NodeCIDR"] == \
        checkconfig.invocation(objects, []).args
    result = check("-f", fixture("gke-kube-proxy-pod.yaml"))
    assert 0 == result.returncode, result.stderr
    assert "7 same, 4 ignored, 0 refused" == result.stdout.splitlines()[-1]


def test_eks_configuration_names_the_field_kube_proxy_no_longer_has() -> None:
    """EKS's ConfigMap still holds udpIdleTimeout: ignored, as kube-proxy's lenient decoding
    drops it; its oomScoreAdj is ignored with the reason."""
    result = check("-f", fixture("eks-kube-proxy.yaml"))
    assert 0 == result.returncode, result.stderr
    lines = result.stdout.splitlines()
    assert "ignored  udpIdleTimeout: 250ms: not a KubeProxyConfiguration v1alpha1 field " \
           "(kube-proxy's lenient decoding drops it too)" in lines
    assert "ignored  oomScoreAdj: -998: iptsync leaves its OOM score to the pod (its " \
           "priority class and requests)" in lines


def test_argument_list_with_refusals_exits_1() -> None:
    """A plain argument list: another proxy mode and an unknown flag are refused (exit 1);
    the rest is still judged."""
    result = check("--", "--proxy-mode=ipvs", "--ipvs-scheduler=rr", "--no-such-flag",
                   "--cluster-cidr=10.0.0.0/8")
    assert 1 == result.returncode
    assert ["refused  --no-such-flag: not a kube-proxy flag (kube-proxy refuses it too)",
            "refused  --proxy-mode=ipvs: --proxy-mode: 'ipvs' is not supported; iptsync "
            "implements kube-proxy's iptables mode only (set iptables, or leave it empty)",
            "ignored  --ipvs-scheduler=rr: only used in ipvs mode, which iptsync does not "
            "implement",
            "same     --cluster-cidr=10.0.0.0/8: the pods' CIDR (one per IP family, "
            "comma-separated): traffic from outside it is masqueraded (detect-local-mode "
            "ClusterCIDR)",
            "1 same, 1 ignored, 2 refused; iptsync would not start"] == \
        result.stdout.splitlines()


def test_k3s_arguments_are_all_same() -> None:
    """k3s/RKE2's kube-proxy arguments: every one applied."""
    args = [line for line in (FIXTURES / "k3s-args.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    result = check("--", *args)
    assert 0 == result.returncode, result.stderr
    assert "8 same, 0 ignored, 0 refused" == result.stdout.splitlines()[-1]


def test_daemonset_without_its_configmap_is_an_input_error() -> None:
    """The --config file lives in a ConfigMap that was not given: exit 2, naming it."""
    result = check("-f", fixture("kubeadm-daemonset.yaml"))
    assert 2 == result.returncode
    assert ("Error: --config /var/lib/kube-proxy/config.conf is key 'config.conf' of "
            "ConfigMap kube-proxy: give that ConfigMap too (-f configmap.yaml)\n") == \
        result.stderr
    assert "" == result.stdout


def test_migration_guides_example_is_what_check_config_prints() -> None:
    """docs/migration.md's example output (kubeadm's pair) is check-config's, line for line."""
    guide = (FIXTURES.parents[2] / "docs" / "migration.md").read_text()
    example = guide.split("it ends like this", 1)[1].split("```\n", 2)[1]
    result = check("-f", fixture("kubeadm-daemonset.yaml"), "-f",
                   fixture("kubeadm-configmap.yaml"))
    shown = [line for line in example.splitlines() if line != "..."]
    assert shown == [line for line in result.stdout.splitlines() if line in shown]
    assert 4 < len(shown)
