"""End to end with the communication profile (issue 18): a TLS SuperLink and 2 SuperNodes on loopback, the
tiny model, the codec of profiles/comm-lean.toml. The run must learn, nothing may be rejected, and the
budget in results.json must be exactly what the codec accounting says for these shapes."""

from __future__ import annotations

import json

import pytest
import tomllib

from fedtune.config import FedTuneConfig
from fedtune.federation import LocalFederation
from tests.conftest import REPO, per_message_bytes, tiny_run_config

pytestmark = pytest.mark.slow
ROUNDS = 2
PROFILE = REPO / "profiles" / "comm-lean.toml"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("federation-codec"), extra_env={"OMP_NUM_THREADS": "1"})
    try:
        yield fed.start(num_supernodes=2)
    finally:
        fed.stop()


def test_profile_run_learns_and_its_budget_is_the_codec_accounting(federation, tiny_model_dir):
    from flwr.common.config import flatten_dict

    from fedtune.codecs.budget import run_budget
    from fedtune.model import initial_adapter_state

    profile = flatten_dict(tomllib.loads(PROFILE.read_text()))
    overrides = tiny_run_config(tiny_model_dir, **{"num-server-rounds": ROUNDS})
    run_id = federation.submit(REPO, profile=PROFILE, overrides=overrides)
    info = federation.wait_for_run(run_id, timeout=900)
    results = json.loads((federation.run_dir(run_id) / "results.json").read_text())
    assert info["status"] == "finished:completed", results.get("error")

    cfg = FedTuneConfig.from_run_config({**profile, **overrides})
    spec = cfg.comm.spec()
    assert spec.active and spec.upload != "none"  # the profile compresses
    rounds = results["rounds"]
    assert all(len(r["replied"]) == 2 and not r["failed"] and not r["rejected"] for r in rounds)
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]

    shapes = {k: tuple(v.shape) for k, v in initial_adapter_state(cfg.model, cfg.train.seed).items()}
    budget = run_budget(shapes, spec, rounds=ROUNDS, nodes_per_round=2)
    assert results["budget_bytes"] == budget.total_bytes
    for record in rounds:
        assert record["bytes_down"] == 2 * budget.down_bytes
        assert record["bytes_up"] == 2 * budget.up_bytes
    # the tiny model's tensors are small, so .npy headers weigh more than for an 8B adapter: less than fp32
    assert budget.total_bytes < per_message_bytes(overrides) * 2 * 2 * ROUNDS
