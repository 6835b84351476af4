"""End to end on real processes: a TLS SuperLink and 2 SuperNodes on loopback, the tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedtune.certs import generate
from fedtune.config import FedTuneConfig
from fedtune.federation import LocalFederation
from tests.conftest import REPO, per_message_bytes, sent_message_bytes, tiny_run_config
from tests.reliability.helpers import clientapps_started, descendants

pytestmark = pytest.mark.slow
ROUNDS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("federation"), extra_env={"OMP_NUM_THREADS": "1"})
    try:
        yield fed.start(num_supernodes=2)
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def finished_run(federation, tiny_model_dir):
    overrides = tiny_run_config(tiny_model_dir, **{"num-server-rounds": ROUNDS})
    run_id = federation.submit(REPO, overrides=overrides)
    info = federation.wait_for_run(run_id, timeout=1200)
    results = json.loads((federation.run_dir(run_id) / "results.json").read_text())
    return run_id, info, results, overrides


def test_run_completes_and_learns(finished_run):
    _, info, results, _ = finished_run
    assert info["status"] == "finished:completed", results.get("error")
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(len(r["replied"]) == 2 and not r["failed"] and not r["rejected"] for r in rounds)
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]


def test_global_adapter_changed_and_checkpoints_load_with_peft(finished_run, federation, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.model import adapter_state, initial_adapter_state

    run_id, _, results, overrides = finished_run
    cfg = FedTuneConfig.from_run_config(overrides)
    initial = initial_adapter_state(cfg.model, cfg.train.seed)
    run_dir = federation.run_dir(run_id)
    for folder in (run_dir / "adapter", run_dir / "checkpoints" / "round-0002"):
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        state = adapter_state(tuned)
        assert state.keys() == initial.keys()
        assert any(not torch.equal(state[k], initial[k]) for k in state)
        assert all(torch.isfinite(v).all() for v in state.values())
    assert Path(results["final_adapter"]) == run_dir / "adapter"


def test_budget_is_the_leaderboard_formula(finished_run):
    _, info, results, overrides = finished_run
    per_message = per_message_bytes(overrides)
    expected = per_message * 2 * 2 * ROUNDS  # 2 nodes, both directions, every round
    assert results["budget_bytes"] == expected
    assert results["budget_mb"] == expected / 1024**2
    for record in results["rounds"]:
        assert record["bytes_down"] == record["bytes_up"] == 2 * per_message
    # beside it, what was actually sent: the packed form both ways (a few buffers + manifest per message)
    sent = sent_message_bytes(overrides)
    assert sent < per_message
    for record in results["rounds"]:
        assert record["sent_bytes_down"] == record["sent_bytes_up"] == 2 * sent, record
        for node in record["nodes"].values():
            assert node["down_sent_bytes"] == node["up_sent_bytes"] == sent
            assert node["down_bytes"] == node["up_bytes"] == per_message
    assert results["sent_bytes"] == sent * 2 * 2 * ROUNDS
    # Flower's own on-wire count is of the same order (chunking, dedup and protocol overhead differ)
    wire = info["network-traffic"]["total-bytes"]
    assert 0.5 * results["sent_bytes"] < wire < 2.0 * results["sent_bytes"]


def test_every_round_has_its_timeline(finished_run):
    """ServerApp sent -> ClientApp started -> adapter in -> trained -> replied -> ServerApp has it ->
    aggregated -> checkpoint written: all stamped, in order (one host, one clock)."""
    _, _, results, _ = finished_run
    for record in results["rounds"]:
        line = record["timeline"]
        assert line["started"] <= line["sent"] <= line["all_replies"] <= line["aggregated"]
        assert line["aggregated"] <= line["checkpoint_written"] == record["checkpoint_written_at"]
        for node in record["nodes"].values():
            stamps = node["timeline"]
            order = [stamps[k] for k in ("server_sent", "clientapp_started", "adapter_in", "trained",
                                         "clientapp_replied", "server_received")]
            assert all(isinstance(t, float) for t in order), stamps
            assert order == sorted(order), stamps
            assert stamps["server_received"] <= line["all_replies"]
            assert node["status"] == "accepted" and node["train_seconds"] > 0
            assert {"data", "model_load", "adapter_in", "train", "adapter_out"} <= set(node["stage_seconds"])


def test_every_message_ran_in_a_prestarted_clientapp(finished_run, federation):
    """fedtune/prestart.py: each round's ClientApp was started ahead (its log line says so), none cold
    (Flower's `flwr-clientapp` CLI logs "Start `flwr-clientapp` process"), and each SuperNode has its next
    worker waiting — a child of the node's SuperExec — once the run is over."""
    assert finished_run[1]["status"] == "finished:completed"
    for node in federation.supernodes:
        log_text = node.log_text()
        assert clientapps_started([node]) == ROUNDS, log_text[-3000:]  # one start a round, each logged once
        assert "Start `flwr-clientapp` process" not in log_text  # none cold
        assert log_text.count("Start prestarted `flwr-clientapp` process") >= ROUNDS
        superexecs = descendants(node.process.pid, "fedtune.prestart clientapp")
        assert len(superexecs) == 1, node.name
        assert len(descendants(superexecs[0], "fedtune.prestart_worker flwr-clientapp")) == 1, node.name


def test_the_run_ran_in_a_prestarted_serverapp(finished_run, federation):
    """fedtune/prestart.py on the SuperLink: the run's ServerApp was a worker started (torch imported)
    before the run was submitted, not Flower's cold `flwr-serverapp` (a ServerApp's output goes to
    `flwr log` only, as Flower has it), and the next run's worker is waiting."""
    run_id, info, _, _ = finished_run
    assert info["status"] == "finished:completed"
    assert federation.superlink is not None
    done = federation.flwr("log", str(run_id), "fedtune-local", "--show")
    run_log = done.stdout + done.stderr
    assert "Start prestarted `flwr-serverapp` process" in run_log, run_log[-2000:]
    assert "Start `flwr-serverapp` process" not in run_log  # not cold
    superexecs = descendants(federation.superlink.process.pid, "fedtune.prestart serverapp")
    assert len(superexecs) == 1
    # the run's own ServerApp process may still be exiting when the run reads finished: wait it out
    workers = descendants(superexecs[0], "fedtune.prestart_worker flwr-serverapp")
    deadline = time.monotonic() + 60
    while len(workers) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = descendants(superexecs[0], "fedtune.prestart_worker flwr-serverapp")
    assert len(workers) == 1, workers  # the next run's, waiting


def test_supernode_with_another_ca_cannot_join(federation, tmp_path):
    foreign = generate(tmp_path / "foreign", ["localhost", "127.0.0.1"])
    node = federation.start_supernode(
        0,
        2,
        root_certificates=foreign.ca_cert,
        extra_args=["--max-retries", "1", "--max-wait-time", "20"],
        name="supernode-foreign-ca",
    )
    deadline = time.monotonic() + 120
    while node.alive() and time.monotonic() < deadline:
        time.sleep(1)
    log = node.log_text()
    assert not node.alive(), "a SuperNode that does not trust the SuperLink's CA must give up"
    assert node.process.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log
