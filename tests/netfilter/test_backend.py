"""Backend detection, xtables-lock retries and cleanup across both backends."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lockholder import HoldLock

from iptsync.kernel.netfilter import (
    Backend,
    Netfilter,
    RestoreError,
    RestoreStream,
    choose_backend,
    detect_backend,
)

SCENARIOS = Path(__file__).parents[1] / "render" / "scenarios"
HINT = ":KUBE-IPTABLES-HINT - [0:0]\n"
HINTED = [("mangle", "KUBE-IPTABLES-HINT")]
CANARY = [("filter", "KUBE-PROXY-CANARY")]


@pytest.mark.parametrize(("nft", "legacy", "nft_rules", "legacy_rules", "expected"), [
    ([], [], 0, 0, Backend.NFT),  # nothing anywhere: nft, the distributions' default
    ([], [], 3, 10, Backend.LEGACY),  # more legacy rules
    ([], [], 10, 3, Backend.NFT),
    (HINTED, [], 0, 50, Backend.NFT),  # kubelet's hint beats rule counts
    ([], HINTED, 50, 0, Backend.LEGACY),
    (HINTED, HINTED, 0, 0, Backend.NFT),  # iptables-wrappers looks at nft first
    ([], [("mangle", "KUBE-KUBELET-CANARY")], 9, 0, Backend.LEGACY),
    ([], CANARY, 50, 0, Backend.LEGACY),  # kube chains in one backend beat rule counts
    (CANARY, HINTED, 0, 0, Backend.LEGACY),  # a hint beats a canary
    (CANARY, CANARY, 3, 10, Backend.LEGACY),  # canaries in both: more rules
])
def test_choose_backend_follows_iptables_wrappers(nft: list[tuple[str, str]],
                                                   legacy: list[tuple[str, str]],
                                                   nft_rules: int, legacy_rules: int,
                                                   expected: Backend) -> None:
    """Hint chains decide first (nft before legacy), then the only backend with kube chains,
    then the backend with more rules; rules are counted only when it comes to that."""
    counted: list[Backend] = []

    def count(backend: Backend) -> int:
        counted.append(backend)
        return nft_rules if backend is Backend.NFT else legacy_rules

    chosen, _why = choose_backend({Backend.NFT: nft, Backend.LEGACY: legacy}, count)
    assert expected == chosen
    hinted_or_alone = HINTED in (nft, legacy) or bool(nft) != bool(legacy)
    assert ([] if hinted_or_alone else list(Backend)) == counted


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
def test_detection_says_what_it_found_and_warns_when_both_backends_hold_kube_chains(
        netns: str, caplog: pytest.LogCaptureFixture) -> None:
    """kube-proxy's canary in legacy alone picks legacy and says so; an nft hint as well picks
    nft, and a warning names what each backend holds."""
    caplog.set_level(logging.INFO, logger="iptsync")
    Netfilter(Backend.LEGACY, netns).restore("*filter\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
    assert Backend.LEGACY == detect_backend(netns)
    assert ["iptables backend legacy: found KUBE-PROXY-CANARY in filter"] == [
        r.getMessage() for r in caplog.records]
    caplog.clear()
    Netfilter(Backend.NFT, netns).restore(f"*mangle\n{HINT}COMMIT\n")
    assert Backend.NFT == detect_backend(netns)
    [info, warning] = caplog.records
    assert "iptables backend nft: found KUBE-IPTABLES-HINT in mangle" == info.getMessage()
    assert logging.WARNING == warning.levelno
    assert ("both iptables backends hold kube chains (nft: KUBE-IPTABLES-HINT in mangle; "
            "legacy: KUBE-PROXY-CANARY in filter); using nft") in warning.getMessage()
    assert "iptsync cleanup --iptables-backend legacy" in warning.getMessage()


@pytest.mark.netns
def test_detection_does_not_read_the_loaded_nat_table(netns: str) -> None:
    """With 40,000 rules in nat in both backends, detection (kube chains in both, a hint in
    nft) takes a third of one iptables-save of each backend at most (it took three each)."""
    rules = [f"-A KUBE-SERVICES -d 10.{i // 250 % 250}.{i % 250}.1/32 -j RETURN"
             for i in range(40_000)]
    for backend in Backend:
        netfilter = Netfilter(backend, netns)
        netfilter.restore(["*nat", ":KUBE-SERVICES - [0:0]", *rules, "COMMIT", "*filter",
                           ":KUBE-PROXY-CANARY - [0:0]", "COMMIT"])
    Netfilter(Backend.NFT, netns).restore(f"*mangle\n{HINT}COMMIT\n")
    started = time.monotonic()
    assert [40_000, 40_000] == [Netfilter(b, netns).rule_count() for b in Backend]
    saving = time.monotonic() - started
    started = time.monotonic()
    assert Backend.NFT == detect_backend(netns)
    assert time.monotonic() - started < saving / 3


@pytest.mark.netns
@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
def test_wait_for_the_xtables_lock_is_logged_with_its_duration(
        netns: str, backend: Backend, xtables_lock: HoldLock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A legacy restore that waits 2 s for a held xtables lock says how long it waited; nft,
    which takes no xtables lock, does not wait."""
    caplog.set_level(logging.INFO, logger="iptsync")
    netfilter = Netfilter(backend, netns)
    with xtables_lock(2):
        netfilter.restore("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n")
    assert "KUBE-SERVICES" in netfilter.save(["filter"])["filter"].chains
    waits = [re.fullmatch(r"waited ([\d.]+)s for the xtables lock (\S+) \(held by another "
                          r"program\)", r.getMessage()) for r in caplog.records]
    seconds = [float(match.group(1)) for match in waits if match]
    if backend is Backend.NFT:
        assert [] == seconds
    else:
        [waited] = seconds
        assert waited >= 1.5


@pytest.mark.netns
def test_streamed_restore_may_take_longer_than_the_lock_wait(netfilter: Netfilter) -> None:
    """A batch still being produced after lock_wait_seconds commits (iptables-legacy-restore
    -w N used to end any run still reading N seconds after it took the lock)."""
    netfilter.lock_wait_seconds = 1
    rules = [f"-A IPTSYNC-SLOW -s 10.0.{i // 250}.{i % 250 + 1}/32 -j RETURN"
             for i in range(5_000)]
    with netfilter.restore_stream() as stream:
        stream.write(["*filter", ":IPTSYNC-SLOW - [0:0]", *rules])  # started: a full chunk
        time.sleep(2)  # as a slow render would
        stream.write(["COMMIT"])
    assert 5_000 == len(netfilter.save(["filter"])["filter"].chains["IPTSYNC-SLOW"])


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
    code = ("from iptsync.kernel.netfilter import Backend, Netfilter; "
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


def test_a_failure_at_a_line_is_a_rejected_batch_even_when_it_says_eagain() -> None:
    """An iptables-restore that fails at a line with "Resource temporarily unavailable"
    (what nft may say; it takes no xtables lock) raises RestoreError naming the line, so the
    tables committed before it are undone, not a lock error retried as it is."""
    script = ("cat >/dev/null; echo 'iptables-restore: line 2 failed: Resource temporarily "
              "unavailable' >&2; exit 1")
    stream = RestoreStream(["sh", "-c", script, "iptables-nft-restore"])
    stream.write(["*filter", ":KUBE-SERVICES - [0:0]", "COMMIT"])
    with pytest.raises(RestoreError) as failure:
        stream.close()
    assert 2 == failure.value.line
