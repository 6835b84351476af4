"""Separate hosts: the SuperLink in one network namespace, each SuperNode in its own, joined by veth pairs on
a bridge (10.213.0.0/24, only between our namespaces). SuperNodes reach the SuperLink by a DNS name that
their /etc/hosts (ip netns' /etc/netns/NS/hosts) maps to its address; TLS verifies that name against the
certificate's SANs, and a name or an address outside the SANs is refused. One node's link is shaped
with tc tbf. Everything is removed in a finally."""

from __future__ import annotations

import shutil
import time

import pytest

from bench.netns import (
    NAME,
    OTHER_IP,
    SUPERLINK_IP,
    WRONG_NAME,
    NetnsFederation,
    available,
    qdisc_bytes,
    setup_network,
    shape,
    teardown_network,
)
from fedtune.certs import certificate_sans, generate
from tests.conftest import REPO
from tests.reliability.conftest import small_config
from tests.reliability.helpers import read_results, report, wait_until

pytestmark = pytest.mark.slow

SHAPED_RATE = "4mbit"


@pytest.mark.skipif(not available(), reason="needs `ip netns` and tc (root)")
def test_separate_hosts_tls_names_and_a_shaped_link(tmp_path, tiny_model_dir):
    try:
        setup_network()
        certs = generate(tmp_path / "certs", [NAME, SUPERLINK_IP, "localhost", "127.0.0.1"])
        assert certificate_sans(certs.server_cert) == {NAME, SUPERLINK_IP, "localhost", "127.0.0.1"}
        fed = NetnsFederation(tmp_path / "fed", extra_env={"OMP_NUM_THREADS": "1"})
        shutil.copytree(certs.ca_cert.parent, fed.certs_dir, dirs_exist_ok=True)
        shaped = shape(1, SHAPED_RATE)
        try:
            fed.start_superlink()
            # negative cases first: a name and an address the certificate does not cover
            quick = ["--max-retries", "1", "--max-wait-time", "20"]
            refused = {
                "wrong name": fed.node(0, "by-wrong-name", f"{WRONG_NAME}:{fed.port}", quick),
                "address outside the SANs": fed.node(0, "by-other-ip", f"{OTHER_IP}:{fed.port}", quick),
            }
            for what, node in refused.items():
                wait_until(lambda node=node: not node.alive(), 180, f"the SuperNode dialling by {what} to fail")
                log = node.log_text()
                assert node.process.returncode != 0, what
                assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log, log[-2000:]
                assert "mismatch" in log.lower() or "not valid for" in log.lower(), log[-2000:]
            fed.node(0, "supernode-0", fed.address)
            fed.node(1, "supernode-1", f"{SUPERLINK_IP}:{fed.port}")  # by address: in the SANs too

            config = small_config(tiny_model_dir)
            started = time.monotonic()
            run_id = fed.submit(REPO, overrides=config)
            info = fed.wait_for_run(run_id, 900, poll=5)
            results = read_results(fed.run_dir(run_id))
            assert info["status"] == "finished:completed", results.get("error")
            assert all(len(r["replied"]) == 2 for r in results["rounds"])
            shaped_bytes = {f"{ns}/{dev}": qdisc_bytes(ns, dev) for ns, dev in shaped}
            per_node = results["budget_bytes"] // 2
            assert sum(shaped_bytes.values()) > per_node, shaped_bytes  # node 1's adapters crossed tbf
            report(
                "separate hosts (netns + veth)", superlink=f"{NAME} ({SUPERLINK_IP})",
                refused=list(refused), shaped=f"supernode-1 at {SHAPED_RATE}", tbf_bytes=shaped_bytes,
                seconds=round(time.monotonic() - started),
            )
        finally:
            fed.stop()
    finally:
        teardown_network()
