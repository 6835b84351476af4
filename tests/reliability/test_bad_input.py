"""Bad input against the real deployment: every case ends in one clear error line and a non-zero exit (or
a failed run / failed node with the reason), never a silent wrong result. File and flag errors of the
launchers, config values and malformed dataset rows are covered in tests/unit."""

from __future__ import annotations

import pytest

from fedtune.errors import FedTuneError
from fedtune.federation import free_port
from tests.conftest import REPO
from tests.reliability.conftest import small_config
from tests.reliability.helpers import read_results, report, run_log, wait_until

pytestmark = pytest.mark.slow


def test_unknown_run_config_key_is_refused_at_submit(auth_federation, tiny_model_dir):
    fed = auth_federation
    with pytest.raises(FedTuneError, match=r"^unknown run config key 'train\.bogus-key'") as err:
        fed.submit(REPO, overrides=small_config(tiny_model_dir, **{"train.bogus-key": 1}))
    # plain `flwr run`: the SuperLink refuses it too, without naming the key
    done = fed.flwr("run", str(REPO), "fedtune-local", "--format", "json", "--run-config", "train.bogus-key=1")
    assert '"success": false' in done.stdout and "Invalid run configuration" in done.stdout, done.stdout
    report("bad input: unknown run-config key", message=str(err.value))


def test_impossible_value_fails_the_run_with_one_line(auth_federation, tiny_model_dir):
    fed = auth_federation
    run_id = fed.submit(REPO, overrides=small_config(tiny_model_dir, **{"train.max-steps": 0}))
    info = fed.wait_for_run(run_id, 300, poll=5)
    assert info["status"] == "finished:failed"
    text = run_log(fed, run_id)
    assert "run config train.max-steps=0: must be > 0" in text, text[-3000:]
    assert not fed.run_dir(run_id).exists()  # refused before anything was written
    report("bad input: impossible value", status=info["status"])


def test_missing_dataset_fails_each_node_with_the_reason(auth_federation, tiny_model_dir, tmp_path):
    fed = auth_federation
    missing = tmp_path / "no-such-data.jsonl"
    config = small_config(
        tiny_model_dir, **{"num-server-rounds": 1, "static.dataset.name": str(missing)}
    )
    run_id = fed.submit(REPO, overrides=config)
    info = fed.wait_for_run(run_id, 600, poll=5)
    results = read_results(fed.run_dir(run_id))
    record = results["rounds"][0]
    assert len(record["failed"]) == 2 and not record["aggregated"], record
    log = run_log(fed, run_id)
    assert "lost 2 of 2" in log and f"Couldn't find any data file at {missing}" in log, log[-3000:]
    # nothing was trained: the run fails instead of "completing" with the initial adapter
    assert info["status"] == "finished:failed" and results["status"] == "failed"
    assert "no update was aggregated" in results["error"]
    report("bad input: missing dataset", failed_nodes=len(record["failed"]), run_status=info["status"])


def test_unreachable_superlink_gives_up_with_non_zero_exit(auth_federation):
    fed = auth_federation
    node = fed._spawn(
        "supernode-unreachable",
        [
            "supernode", "--superlink", f"127.0.0.1:{free_port()}", "--root-certificates", str(fed.ca_cert),
            "--partition-id", "0", "--num-partitions", "2", "--clientapp-port", str(free_port()),
            "--max-retries", "2", "--max-wait-time", "15",
        ],
        fed.env(),
    )
    fed.supernodes.append(node)
    wait_until(lambda: not node.alive(), 120, "the SuperNode to give up")
    assert node.process.returncode != 0
    log = node.log_text()
    assert "Giving up reconnection" in log and "Connection refused" in log, log[-2000:]
    report("bad input: unreachable SuperLink", exit_code=node.process.returncode)
