"""The DaemonSet's securityContext is enough for the agent, and each part of it is needed.

No container engine runs here, so the container is rebuilt from the rendered manifest around
the real agent: inside a fresh network namespace, a private mount namespace remounts every
mount read-only (the root and /proc/sys as a runtime does for ``readOnlyRootFilesystem`` and an
unprivileged container), mounts the container's writable volumes (each emptyDir a tmpfs, each
hostPath file bound from a private copy), and ``setpriv`` keeps only the capabilities the
manifest adds, with no_new_privs (``allowPrivilegeEscalation: false``). The capability list and
the writable paths come from ``kubectl kustomize deploy/``, so manifest and test cannot drift.
The seccomp profile (``RuntimeDefault``) is not reproduced: see docs/security.md.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent.waiting import eventually

from iptsync.kernel.netfilter import Netfilter

from .conftest import ROOT

pytestmark = pytest.mark.netns

OBJECTS = ROOT / "examples" / "seed-002" / "nodeport"
NODE_FLAGS = ["--objects", str(OBJECTS), "--hostname-override", "node1",
              "--cluster-cidr", "10.0.0.0/14"]

# Runs as root in its own mount namespace (unshare); never on the host's mounts: the first
# line refuses to go on in the host's mount namespace. ``remount,bind,ro`` changes only this
# namespace's view of a mount, never the filesystem itself. Network namespace handles (nsfs)
# are left alone: other tests create and delete them meanwhile, and a deleted one vanishes
# from this view too.
_READ_ONLY_VIEW = """set -eu
[ "$(readlink /proc/self/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] || exit 99
findmnt -rno TARGET,FSTYPE,OPTIONS | while read -r target fstype options; do
    case "$target" in /proc|/proc/*) continue ;; esac
    [ "$fstype" != nsfs ] || continue
    case ",$options," in *,rw,*) mount -o remount,bind,ro "$target" ;; esac
done
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
"""


def granted_capabilities(container: dict[str, Any]) -> list[str]:
    """The capabilities the container runs with: what it adds after dropping ALL."""
    capabilities = container["securityContext"]["capabilities"]
    assert ["ALL"] == capabilities["drop"]
    return [str(name) for name in capabilities["add"]]


def container_volumes(container: dict[str, Any], pod: dict[str, Any],
                      scratch: Path) -> str:
    """Shell lines mounting the container's writable volumes over the read-only view."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    binds, tmpfs = [], []
    for mount in container["volumeMounts"]:
        if mount.get("readOnly", False):
            continue
        target, volume = shlex.quote(mount["mountPath"]), volumes[mount["name"]]
        if "emptyDir" in volume:
            # A binary quantity (64Mi) in tmpfs's units (64m).
            size = volume["emptyDir"]["sizeLimit"].removesuffix("i").lower()
            tmpfs.append(_covering(f"mount -t tmpfs -o size={size} tmpfs {target}",
                                   Path(mount["mountPath"])))
        elif volume.get("hostPath", {}).get("type") == "FileOrCreate":
            source = scratch / mount["name"]
            source.touch()
            # A node without the file yet gets it, as kubelet creates it (FileOrCreate).
            binds.append(f"[ -e {target} ] || {{ mount -t tmpfs tmpfs "
                         f"$(dirname {target}); : > {target}; }}\n"
                         f"mount --bind {shlex.quote(str(source))} {target}")
        else:
            pytest.fail(f"no stand-in for the writable volume {volume}")
    # Binds first: their private sources may live under a path an emptyDir then covers.
    return "\n".join([*binds, *tmpfs]) + "\n"


def _covering(mount_line: str, target: Path) -> str:
    """``mount_line`` (a volume over ``target``), keeping the code under test visible: a
    checkout or virtualenv below ``target`` (a clone in /tmp, under the /tmp emptyDir) is held
    on a scratch tmpfs at /mnt while the volume goes on, then bound back at its path."""
    keep = [path for path in dict.fromkeys((ROOT.resolve(), Path(sys.prefix).resolve()))
            if path.is_relative_to(target)
            and not any(path != other and path.is_relative_to(other)
                        for other in (ROOT.resolve(), Path(sys.prefix).resolve()))]
    if not keep:
        return mount_line
    hold = ["mount -t tmpfs tmpfs /mnt"]
    for index, path in enumerate(keep):
        hold += [f"mkdir /mnt/{index}", f"mount --bind {shlex.quote(str(path))} /mnt/{index}"]
    back = [line for index, path in enumerate(keep)
            for line in (f"mkdir -p {shlex.quote(str(path))}",
                         f"mount --bind /mnt/{index} {shlex.quote(str(path))}",
                         f"umount /mnt/{index}")]
    return "\n".join([*hold, mount_line, *back, "umount /mnt"])


def container_command(netns: str, capabilities: list[str], volumes: str,
                      argv: list[str]) -> list[str]:
    """``argv`` run in ``netns`` as the container would run it: read-only view, the given
    volumes, only these capabilities, no_new_privs."""
    caps = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
    script = _READ_ONLY_VIEW + volumes + 'exec "$@"\n'
    return ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
            "--", "sh", "-c", script, "sandbox",
            "setpriv", "--no-new-privs", f"--inh-caps={caps}", f"--bounding-set={caps}",
            "--", *argv]


def in_container(netns: str, capabilities: list[str], volumes: str,
                 argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end in the stand-in container."""
    return subprocess.run(container_command(netns, capabilities, volumes, argv),
                          capture_output=True, text=True, timeout=120, check=False)


def run_once(netfilter: Netfilter) -> list[str]:
    return [sys.executable, "-m", "iptsync.cli", "run", "--once", *NODE_FLAGS,
            "--iptables-backend", netfilter.backend.value]


def live_matches_a_full_sync(netfilter: Netfilter) -> bool:
    """``iptsync diff --live`` (with every privilege, outside the sandbox) finds nothing to do."""
    assert netfilter.netns is not None
    result = subprocess.run(["ip", "netns", "exec", netfilter.netns, sys.executable, "-m",
                             "iptsync.cli", "diff", "--live", *NODE_FLAGS,
                             "--iptables-backend", netfilter.backend.value],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def owned_chains(netfilter: Netfilter) -> list[str]:
    return [chain for saved in netfilter.save().values() for chain in saved.chains
            if chain.startswith("KUBE-")]


@pytest.fixture
def volumes(container: dict[str, Any], pod: dict[str, Any], tmp_path: Path) -> str:
    return container_volumes(container, pod, tmp_path)


def test_agent_syncs_with_only_the_manifests_privileges(
        netfilter: Netfilter, container: dict[str, Any], volumes: str) -> None:
    """run --once succeeds with the manifest's capabilities, read-only root and volumes, and
    writes what a full sync writes; /proc/sys being read-only costs only a warning."""
    assert netfilter.netns is not None
    result = in_container(netfilter.netns, granted_capabilities(container), volumes,
                          run_once(netfilter))
    assert 0 == result.returncode, result.stderr
    assert live_matches_a_full_sync(netfilter)
    assert "cannot set sysctl net.ipv4.conf.all.route_localnet=1" in result.stderr


def healthz_status(netns: str) -> str:
    """The status of /healthz on the agent's default address, asked from inside ``netns``."""
    ask = ("import urllib.request\ntry:\n    print(urllib.request.urlopen("
           "'http://127.0.0.1:10256/healthz', timeout=2).status)\nexcept OSError as err:\n"
           "    print(err)")
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", ask],
                          capture_output=True, text=True, timeout=30, check=False).stdout.strip()


def test_long_running_agent_serves_health_with_only_the_manifests_privileges(
        netfilter: Netfilter, container: dict[str, Any], volumes: str) -> None:
    """The agent itself (not --once) syncs, answers /healthz 200 on its default address, and
    stops cleanly on SIGTERM, all inside the stand-in container."""
    assert netfilter.netns is not None
    argv = [sys.executable, "-m", "iptsync.cli", "run", *NODE_FLAGS,
            "--iptables-backend", netfilter.backend.value]
    agent = subprocess.Popen(
        container_command(netfilter.netns, granted_capabilities(container), volumes, argv),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: "200" == healthz_status(str(netfilter.netns)) or None, timeout=30)
        assert live_matches_a_full_sync(netfilter)
    finally:
        agent.terminate()
        _, errors = agent.communicate(timeout=30)
    assert 0 == agent.returncode, errors


def test_stand_in_container_cannot_write_outside_its_volumes(
        netns: str, container: dict[str, Any], volumes: str) -> None:
    """The stand-in is faithful: the image and /proc/sys are read-only, /tmp is writable."""
    probe = ("touch /tmp/probe && echo tmp-ok; "
             f"touch {shlex.quote(str(ROOT / 'probe'))} || echo root-ro; "
             "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet || echo sys-ro")
    result = in_container(netns, granted_capabilities(container), volumes,
                          ["sh", "-c", probe])
    assert ["tmp-ok", "root-ro", "sys-ro"] == result.stdout.split()
    assert not (ROOT / "probe").exists()


def test_without_net_admin_nothing_is_written_and_the_error_names_iptables(
        netfilter: Netfilter, container: dict[str, Any], volumes: str) -> None:
    """Dropping NET_ADMIN makes the sync fail: exit status 1, an ERROR naming the iptables
    command, no rule written."""
    assert netfilter.netns is not None
    capabilities = [cap for cap in granted_capabilities(container) if cap != "NET_ADMIN"]
    result = in_container(netfilter.netns, capabilities, volumes, run_once(netfilter))
    assert 1 == result.returncode
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert errors, result.stderr
    assert f"iptables-{netfilter.backend.value}-" in errors[0]
    assert [] == owned_chains(netfilter)


@pytest.mark.parametrize(("backend", "succeeds"), [("nft", True), ("legacy", False)])
def test_net_raw_is_what_the_legacy_backend_needs(
        netns: str, container: dict[str, Any], volumes: str, backend: str,
        succeeds: bool) -> None:
    """Without NET_RAW the nft backend still syncs and the legacy one cannot: NET_RAW is in
    the manifest for legacy nodes."""
    capabilities = [cap for cap in granted_capabilities(container) if cap != "NET_RAW"]
    argv = [sys.executable, "-m", "iptsync.cli", "run", "--once", *NODE_FLAGS,
            "--iptables-backend", backend]
    result = in_container(netns, capabilities, volumes, argv)
    assert succeeds == (0 == result.returncode), result.stderr


def test_without_the_tmp_volume_the_agent_cannot_sync(
        netfilter: Netfilter, container: dict[str, Any]) -> None:
    """On the read-only root without the /tmp emptyDir the sync fails (Python finds no
    temporary directory for iptables-restore's errors): the volume is needed."""
    assert netfilter.netns is not None
    result = in_container(netfilter.netns, granted_capabilities(container), "",
                          run_once(netfilter))
    assert 0 != result.returncode
    assert "No usable temporary directory" in result.stderr
