"""Fault injection on a real authenticated TLS deployment (tiny model, 2 rounds × 2 steps):
unauthorised SuperNodes, a SuperNode killed mid-round, the SuperLink killed mid-run and restarted on the
same database, the ServerApp killed mid-run. Runs resumed with `resume.from` must end with exactly the
adapter of an uninterrupted run, and the budget must count only what was sent."""

from __future__ import annotations

import time

import pytest

from fedtune.auth import generate as generate_key
from fedtune.certs import generate as generate_certs
from tests.conftest import REPO, per_message_bytes, sent_message_bytes
from tests.reliability.conftest import small_config
from tests.reliability.helpers import (
    all_finite,
    clientapps_started,
    descendants,
    kill9,
    load_state,
    max_abs_diff,
    read_results,
    report,
    rounds_done,
    run_log,
    states_equal,
    wait_until,
)

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 900


def wait_for_round_2_in_flight(fed, run_dir, started_before: int) -> None:
    """Round 1 aggregated, and a ClientApp task of round 2 started on some SuperNode."""
    wait_until(lambda: rounds_done(run_dir) >= 1, RUN_TIMEOUT, "round 1 to finish")
    round_1_tasks = len(read_results(run_dir)["rounds"][0]["nodes"])
    wait_until(lambda: clientapps_started(fed.supernodes) - started_before > round_1_tasks, 300,
               "round 2 to be in flight", poll=0.2)


def wait_for_exit(node, timeout: float = 120) -> str:
    wait_until(lambda: not node.alive(), timeout, f"{node.name} to give up")
    return node.log_text()


# ------------------------------------------------------------------ authentication
def test_unauthorised_supernodes_are_refused(auth_federation, tmp_path):
    fed = auth_federation
    quick = ["--max-retries", "1", "--max-wait-time", "20"]
    no_key = fed.start_supernode(0, 2, extra_args=quick, name="intruder-no-key", auth=False)
    stranger, _ = generate_key(tmp_path / "keys", "stranger")  # a valid key nobody registered
    unregistered = fed.start_supernode(
        0, 2, extra_args=[*quick, "--auth-key", str(stranger.private_key)], name="intruder-unregistered",
        auth=False,
    )
    foreign = generate_certs(tmp_path / "foreign", ["localhost", "127.0.0.1"])
    wrong_ca = fed.start_supernode(
        0, 2, root_certificates=foreign.ca_cert, extra_args=quick, name="intruder-wrong-ca"
    )
    outcomes = {}
    for node, marker in ((no_key, "2001"), (unregistered, "2004"), (wrong_ca, "CERTIFICATE_VERIFY_FAILED")):
        log = wait_for_exit(node)
        assert node.process.returncode != 0, f"{node.name} must exit non-zero"
        assert marker in log or marker.lower().replace("_", " ") in log.lower(), log[-2000:]
        outcomes[node.name] = node.process.returncode
    listed = fed.flwr("supernode", "ls", "fedtune-local", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    report("unauthorised supernodes", refused_exit_codes=outcomes)


# ------------------------------------------------------------------ the reference
@pytest.fixture(scope="module")
def clean_run(auth_federation, tiny_model_dir):
    fed = auth_federation
    config = small_config(tiny_model_dir)
    run_id = fed.submit(REPO, overrides=config)
    info = fed.wait_for_run(run_id, RUN_TIMEOUT, poll=5)
    run_dir = fed.run_dir(run_id)
    results = read_results(run_dir)
    assert info["status"] == "finished:completed", results.get("error")
    return config, run_dir, results


def test_clean_run_with_authenticated_nodes(clean_run):
    config, _, results = clean_run
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(len(r["replied"]) == 2 and not r["failed"] for r in results["rounds"])
    assert results["budget_bytes"] == per_message_bytes(config) * 2 * 2 * 2
    assert results["sent_bytes"] == sent_message_bytes(config) * 2 * 2 * 2
    report("clean reference run", rounds=2, budget_bytes=results["budget_bytes"])


def check_resumed(fed, interrupted_dir, resumed_id, clean, what: str, rounds_before: int) -> None:
    _, clean_dir, clean_results = clean
    info = fed.wait_for_run(resumed_id, RUN_TIMEOUT, poll=5)
    resumed_dir = fed.run_dir(resumed_id)
    results = read_results(resumed_dir)
    assert info["status"] == "finished:completed", results.get("error")
    assert results["resumed_from"] == read_results(interrupted_dir)["run_id"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]  # counters continue; nothing repeated
    # nothing already trained is lost: the interrupted run's saved rounds are the clean run's
    for n in range(1, rounds_before + 1):
        saved = interrupted_dir / "checkpoints" / f"round-{n:04d}"
        assert states_equal(load_state(saved), load_state(clean_dir / "checkpoints" / f"round-{n:04d}"))
    final, reference = load_state(resumed_dir / "adapter"), load_state(clean_dir / "adapter")
    assert all_finite(final)
    exact = states_equal(final, reference)
    assert exact or max_abs_diff(final, reference) < 1e-6, max_abs_diff(final, reference)
    # budget: the rounds that finished, each counted once (the lost in-flight round is not)
    assert results["budget_bytes"] == clean_results["budget_bytes"]
    report(
        what, rounds_saved_before_crash=rounds_before, rounds_lost=0, resumed_run=resumed_id,
        final_equals_clean_run="exact" if exact else "within 1e-6", budget_bytes=results["budget_bytes"],
    )


# ------------------------------------------------------------------ SuperLink crash
def test_superlink_killed_mid_run_then_resumed(auth_federation, clean_run):
    fed = auth_federation
    config = clean_run[0]
    started_before = clientapps_started(fed.supernodes)
    run_id = fed.submit(REPO, overrides=config)
    run_dir = fed.run_dir(run_id)
    wait_for_round_2_in_flight(fed, run_dir, started_before)
    assert fed.superlink is not None
    fed.superlink.kill()  # kill -9 of the SuperLink and its ServerApp
    rounds_before = rounds_done(run_dir)
    assert rounds_before == 1, "the crash must hit round 2 in flight"
    assert read_results(run_dir)["status"] == "running"  # nobody had the chance to write anything

    fed.start_superlink()  # same port, same database: runs and registered nodes survive
    old = fed.run_info(run_id)
    assert old["status"].startswith("finished") or old["status"] == "running"
    resumed = fed.submit(REPO, overrides={**config, "resume.from": str(run_dir)})
    check_resumed(fed, run_dir, resumed, clean_run, "SuperLink kill -9 + restart + resume", rounds_before)


# ------------------------------------------------------------------ ServerApp crash
def test_serverapp_killed_mid_run_then_resumed(auth_federation, clean_run):
    fed = auth_federation
    config = clean_run[0]
    started_before = clientapps_started(fed.supernodes)
    run_id = fed.submit(REPO, overrides=config)
    run_dir = fed.run_dir(run_id)
    wait_for_round_2_in_flight(fed, run_dir, started_before)
    assert fed.superlink is not None
    serverapps = descendants(fed.superlink.process.pid, "flwr-serverapp")
    assert serverapps, "the SuperLink runs the ServerApp as a child process"
    for pid in serverapps:
        kill9(pid)
    rounds_before = rounds_done(run_dir)
    assert rounds_before == 1
    assert fed.superlink.alive()
    resumed = fed.submit(REPO, overrides={**config, "resume.from": str(run_dir)})
    check_resumed(fed, run_dir, resumed, clean_run, "ServerApp kill -9 + resume", rounds_before)


# ------------------------------------------------------------------ SuperNode loss
def test_supernode_killed_mid_round_is_reported_and_rejoins(auth_federation, tiny_model_dir):
    fed = auth_federation
    config = small_config(tiny_model_dir)
    victim = next(n for n in fed.supernodes if n.name == "supernode-1" and n.alive())
    victim_id = fed.registered_keys["supernode-1"]
    started_before = clientapps_started([victim])
    run_id = fed.submit(REPO, overrides=config)
    run_dir = fed.run_dir(run_id)
    wait_until(lambda: clientapps_started([victim]) > started_before, 300, "round 1 on the victim", poll=0.2)
    victim.kill()
    killed_at = time.monotonic()
    wait_until(lambda: rounds_done(run_dir) >= 1, 600, "round 1 to aggregate without the lost node")
    detected_after = time.monotonic() - killed_at
    first = read_results(run_dir)["rounds"][0]
    assert first["failed"] == [victim_id], first
    assert first["aggregated"] and len(first["replied"]) == 1
    per_message = per_message_bytes(config)
    assert first["bytes_down"] == 2 * per_message  # sent to both
    assert first["bytes_up"] == per_message  # only the survivor's update arrived
    assert first["sent_bytes_up"] == sent_message_bytes(config)
    log = run_log(fed, run_id)
    assert f"node {victim_id} failed" in log and "lost 1 of 2" in log, log[-3000:]

    fed.start_supernode(1, 2)  # same key, same node id: it rejoins, and round 2 waits for it
    info = fed.wait_for_run(run_id, RUN_TIMEOUT, poll=5)
    results = read_results(run_dir)
    assert info["status"] == "finished:completed", results.get("error")
    second = results["rounds"][1]
    assert victim_id in second["replied"] and not second["failed"]
    assert results["budget_bytes"] == (2 + 1 + 2 + 2) * per_message
    assert all_finite(load_state(run_dir / "adapter"))
    report(
        "SuperNode kill -9 mid-round", lost_node=victim_id, detected_after_s=round(detected_after),
        round1_replies=len(first["replied"]), rejoined_round=2, rounds_lost=0,
    )
