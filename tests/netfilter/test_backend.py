"""Backend detection, xtables-lock retries and cleanup across both backends."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from lockholder import HoldLock

from iptsync.netfilter import Backend, Netfilter, RestoreError, choose_backend, detect_backend

SCENARIOS = Path(__file__).parents[1] / "render" / "scenarios"
HINT = ":KUBE-IPTABLES-HINT - [0:0]\n"


@pytest.mark.parametrize(("nft_mangle", "legacy_mangle", "nft_rules", "legacy_rules", "expected"), [
    ("", "", 0, 0, Backend.NFT),  # nothing anywhere: nft, the distributions' default
    ("", "", 3, 10, Backend.LEGACY),  # more legacy rules
    ("", "", 10, 3, Backend.NFT),
    (HINT, "", 0, 50, Backend.NFT),  # kubelet's hint beats rule counts
    ("", HINT, 50, 0, Backend.LEGACY),
    (HINT, HINT, 0, 0, Backend.NFT),  # iptables-wrappers looks at nft first
    ("", ":KUBE-KUBELET-CANARY - [0:0]\n", 9, 0, Backend.LEGACY),
])
def test_choose_backend_follows_iptables_wrappers(nft_mangle: str, legacy_mangle: str,
                                                   nft_rules: int, legacy_rules: int,
                                                   expected: Backend) -> None:
    """Hint chains decide first (nft before legacy), then the backend with more rules."""
    assert expected == choose_backend(nft_mangle, legacy_mangle, nft_rules, legacy_rules)


@pytest.mark.netns
def test_detect_backend_reads_both_backends(netns: str) -> None:
    """In a namespace: empty -> nft; legacy rules -> legacy; an nft hint chain -> nft."""
    assert Backend.NFT == detect_backend(netns)
    legacy = Netfilter(Backend.LEGACY, netns)
    legacy.restore("*filter\n-A INPUT -s 192.0.2.1/32 -j ACCEPT\n-A INPUT -s 192.0.2.2/32 "
                   "-j ACCEPT\nCOMMIT\n")
    assert Backend.LEGACY == detect_backend(netns)
    Netfilter(Backend.NFT, netns).restore(f"*mangle\n{HINT}COMMIT\n")
    assert Backend.NFT == detect_backend(netns)


@pytest.mark.netns
def test_restore_retries_while_the_xtables_lock_is_held(netns: str,
                                                        xtables_lock: HoldLock) -> None:
    """A restore that meets a held xtables lock is retried until the lock is released."""
    netfilter = Netfilter(Backend.LEGACY, netns, lock_wait_seconds=1)
    with xtables_lock(1.5):
        started = time.monotonic()
        netfilter.restore("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n")
        assert time.monotonic() - started > 1.0  # the first attempt did wait and fail
    assert "KUBE-SERVICES" in netfilter.save(["filter"])["filter"].chains


@pytest.mark.netns
@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
def test_chain_exists_in_a_node_namespace(netns: str, backend: Backend) -> None:
    """The canary check works from inside the namespace (python-iptables on legacy)."""
    Netfilter(backend, netns).restore("*nat\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
    code = ("from iptsync.netfilter import Backend, Netfilter; "
            f"nf = Netfilter(Backend({backend.value!r})); "
            "print(nf.chain_exists('nat', 'KUBE-PROXY-CANARY'), nf.chain_exists('nat', 'NOPE'))")
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                            capture_output=True, text=True, check=True)
    assert "True False" == result.stdout.strip()


@pytest.mark.netns
def test_cleanup_command_clears_both_backends_and_keeps_foreign_rules(netns: str) -> None:
    """`iptsync cleanup` removes our chains from nft and legacy; other rules stay."""
    foreign = "*filter\n:MINE - [0:0]\n-A INPUT -j MINE\nCOMMIT\n"
    for backend in Backend:
        Netfilter(backend, netns).restore(foreign)
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "iptsync.cli",
                        "run", "--once", "--iptables-backend", backend.value, "--objects",
                        str(SCENARIOS / "upstream-overall.yaml"), "--hostname-override",
                        "test-node"], check=True, capture_output=True)
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "iptsync.cli",
                    "cleanup"], check=True, capture_output=True)
    for backend in Backend:
        saved = Netfilter(backend, netns).save()
        ours = [c for t, s in saved.items() for c in s.chains
                if c.startswith("KUBE-") and c != "KUBE-FIREWALL"]
        assert [] == ours, backend
        assert ["-j MINE"] == saved["filter"].chains["INPUT"][-1:]


@pytest.mark.netns
def test_large_payload_is_streamed_and_a_late_bad_line_is_named(netfilter: Netfilter) -> None:
    """A batch of several chunks loads whole; one whose bad line sits in its last chunk fails
    with that line's number and text, and commits nothing."""
    rules = [f"-A IPTSYNC-T -s 10.{i // 250 % 250}.{i % 250}.1/32 -j RETURN"
             for i in range(45_000)]
    netfilter.restore(["*filter", ":IPTSYNC-T - [0:0]", *rules, "COMMIT"], noflush=False)
    assert 45_000 == len(netfilter.save(["filter"])["filter"].chains["IPTSYNC-T"])
    bad = ["*filter", ":IPTSYNC-U - [0:0]", *rules[:44_000], "-A IPTSYNC-U --no-such-option",
           *rules[:10], "COMMIT"]
    with pytest.raises(RestoreError) as failure:
        netfilter.restore(bad)
    assert 44_003 == failure.value.line
    assert "> 44003  -A IPTSYNC-U --no-such-option" in failure.value.context
    assert "IPTSYNC-U" not in netfilter.save(["filter"])["filter"].chains


@pytest.mark.netns
def test_stream_that_fails_early_reports_the_line_while_more_was_being_written(
        netfilter: Netfilter) -> None:
    """iptables-restore stops reading at an early bad line while the stream still writes
    (as a full sync still rendering would): the broken pipe is absorbed, the error names the
    line, and nothing is committed."""
    rules = [f"-A IPTSYNC-V -s 10.0.{i // 250 % 250}.{i % 250 + 1}/32 -j RETURN"
             for i in range(3_000)]
    stream = netfilter.restore_stream()
    stream.write(["*filter", ":IPTSYNC-V - [0:0]", "-A IPTSYNC-V --no-such-option"])
    for _ in range(30):  # 90,000 lines: far more than the pipe holds
        stream.write(rules)
    stream.write(["COMMIT"])
    with pytest.raises(RestoreError) as failure:
        stream.close()
    assert 3 == failure.value.line
    assert "IPTSYNC-V" not in netfilter.save(["filter"])["filter"].chains
