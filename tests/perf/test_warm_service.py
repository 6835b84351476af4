"""The node-local warm trainer: same result as in-process training, model kept across rounds, and the
ClientApp falls back to in-process training when the service is absent or dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_run_config


def global_arrays(model_dir: Path, run_config: dict):
    from fedtune.config import FedTuneConfig
    from fedtune.model import initial_adapter_state, state_to_arrays

    cfg = FedTuneConfig.from_run_config(run_config)
    return state_to_arrays(initial_adapter_state(cfg.model, cfg.train.seed), cfg.model.transport_dtype)


def call_clientapp(run_config, node_config, arrays, server_round=1, learning_rate=1e-3):
    from bench.messages import train_message
    from clientapp.client_app import train

    msg, context = train_message(
        arrays,
        {"server-round": server_round, "learning-rate": learning_rate, "transport-dtype": "float32"},
        node_config,
        run_config,
    )
    return train(msg, context).content


def start_service(folder: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    private = folder / "run"
    private.mkdir(mode=0o700)
    sock = str(private / "trainer.sock")
    ready = folder / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clientapp.warm.service", "--socket", sock, "--ready-file", str(ready), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, "service died at start"
        assert time.time() < deadline, "service did not come up"
        time.sleep(0.1)
    return proc, sock


@pytest.fixture
def service(tmp_path):
    proc, sock = start_service(tmp_path)
    yield proc, sock
    proc.terminate()
    proc.wait(timeout=30)


def test_warm_round_matches_in_process_and_keeps_the_model(tiny_model_dir, demo_data_file, service):
    from clientapp.warm.protocol import ping

    _proc, sock = service
    run_config = tiny_run_config(tiny_model_dir, **{"train.max-steps": 2, "train.optim": "adamw_torch"})
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(demo_data_file)}
    arrays = global_arrays(tiny_model_dir, run_config)

    local = call_clientapp(run_config, node, arrays)
    warm1 = call_clientapp(run_config, {**node, "trainer-socket": sock}, arrays)
    warm2 = call_clientapp(run_config, {**node, "trainer-socket": sock}, arrays, server_round=2)

    assert ping(sock)["rounds"] == 2
    assert warm2["metrics"]["time-model-load"] < 0.01  # the model stayed loaded
    for content in (warm1, warm2):
        assert content["metrics"]["train-loss"] == pytest.approx(local["metrics"]["train-loss"], rel=1e-4)
        assert list(content["arrays"]) == list(local["arrays"])
        for key in local["arrays"]:
            np.testing.assert_allclose(
                content["arrays"][key].numpy(), local["arrays"][key].numpy(), rtol=0, atol=1e-6
            )


def wait_for_trainer_ahead(sock: str) -> None:
    """The service builds the next round's trainer after it has replied: wait until it has."""
    from clientapp.warm.protocol import ping

    deadline = time.time() + 60
    while not ping(sock)["trainer_ahead"]:
        assert time.time() < deadline, "the next round's trainer was never built"
        time.sleep(0.05)


def test_a_trainer_built_ahead_trains_at_the_rounds_learning_rate(tiny_model_dir, demo_data_file, service):
    _proc, sock = service
    run_config = tiny_run_config(tiny_model_dir, **{"train.max-steps": 2, "train.optim": "adamw_torch"})
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(demo_data_file)}
    warm = {**node, "trainer-socket": sock}
    arrays = global_arrays(tiny_model_dir, run_config)

    first = call_clientapp(run_config, warm, arrays)  # lr 1e-3; then the service builds round 2's trainer
    assert first["metrics"]["time-trainer-setup"] > 0
    wait_for_trainer_ahead(sock)
    ahead = call_clientapp(run_config, warm, arrays, server_round=2, learning_rate=5e-2)
    local = call_clientapp(run_config, node, arrays, server_round=2, learning_rate=5e-2)

    assert ahead["metrics"]["time-trainer-setup"] == 0.0  # built between rounds, not in this one
    assert ahead["metrics"]["train-loss"] == pytest.approx(local["metrics"]["train-loss"], rel=1e-4)
    for key in local["arrays"]:
        got, want = ahead["arrays"][key].numpy(), local["arrays"][key].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    moved = [not np.allclose(ahead["arrays"][k].numpy(), first["arrays"][k].numpy()) for k in local["arrays"]]
    assert any(moved), "round 2 trained at round 1's learning rate"

    # settings the trainer was not built for: the round builds its own
    wait_for_trainer_ahead(sock)
    other = tiny_run_config(tiny_model_dir, **{"train.max-steps": 1, "train.optim": "adamw_torch"})
    changed = call_clientapp(other, warm, arrays, server_round=3)
    assert changed["metrics"]["train-steps"] == 1
    assert changed["metrics"]["time-trainer-setup"] > 0


def test_the_preloads_warm_up_changes_no_rounds_result(tiny_model_dir, demo_data_file, tmp_path):
    from clientapp.warm.protocol import ping
    from fedtune.toml_io import write

    run_config = tiny_run_config(tiny_model_dir, **{"train.max-steps": 2, "train.optim": "adamw_torch"})
    preload = write(tmp_path / "preload.toml", run_config)
    proc, sock = start_service(tmp_path, "--preload", str(preload), FEDTUNE_WARM_UP="1")
    try:
        deadline = time.time() + 300
        while (status := ping(sock))["preload"] == "loading":
            assert time.time() < deadline, "preload did not finish"
            time.sleep(0.2)
        assert status["preload"] == "done"
        assert status["warm_up_seconds"] > 0  # it trained its warm-up rounds (on a CPU only when asked)
        node = {"partition-id": 0, "num-partitions": 2, "data-path": str(demo_data_file)}
        arrays = global_arrays(tiny_model_dir, run_config)
        warm = call_clientapp(run_config, {**node, "trainer-socket": sock}, arrays)
        local = call_clientapp(run_config, node, arrays)
        assert warm["metrics"]["time-model-load"] < 0.01  # preloaded
        assert warm["metrics"]["train-loss"] == pytest.approx(local["metrics"]["train-loss"], rel=1e-4)
        for key in local["arrays"]:
            got, want = warm["arrays"][key].numpy(), local["arrays"][key].numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_clientapp_falls_back_when_the_service_is_absent_or_gone(
    tiny_model_dir, demo_data_file, service, tmp_path
):
    proc, sock = service
    run_config = tiny_run_config(tiny_model_dir, **{"train.max-steps": 1, "train.optim": "adamw_torch"})
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(demo_data_file)}
    arrays = global_arrays(tiny_model_dir, run_config)

    absent = call_clientapp(run_config, {**node, "trainer-socket": str(tmp_path / "none.sock")}, arrays)
    assert absent["metrics"]["train-steps"] == 1

    proc.kill()  # crash: the socket file stays behind, nobody listens
    proc.wait(timeout=30)
    gone = call_clientapp(run_config, {**node, "trainer-socket": sock}, arrays)
    assert gone["metrics"]["train-steps"] == 1
    assert gone["metrics"]["train-loss"] == pytest.approx(absent["metrics"]["train-loss"], rel=1e-4)


def test_service_reports_training_errors(tiny_model_dir, demo_data_file, service):
    from fedtune.errors import FedTuneError

    _, sock = service
    run_config = tiny_run_config(tiny_model_dir, **{"model.name": str(tiny_model_dir / "missing")})
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(demo_data_file), "trainer-socket": sock}
    arrays = global_arrays(tiny_model_dir, tiny_run_config(tiny_model_dir))
    with pytest.raises(FedTuneError, match="warm trainer"):
        call_clientapp(run_config, node, arrays)


CLIENTAPP_ONLY = """
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord
from clientapp.client_app import train
from bench.messages import train_message

spec = json.loads(sys.argv[1])
with np.load(spec["adapter"]) as data:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(data[k])) for k in data.files})
msg, context = train_message(arrays, spec["round"], spec["node"], spec["run_config"])
reply = train(msg, context)
heavy = sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets") if m in sys.modules)
print(json.dumps({"heavy": heavy, "steps": reply.content["metrics"]["train-steps"]}))
"""


def test_warm_clientapp_process_never_imports_torch(tiny_model_dir, demo_data_file, service, tmp_path):
    """The ClientApp process Flower starts per message stays light when a warm trainer does the round."""
    import json

    _proc, sock = service
    run_config = tiny_run_config(tiny_model_dir, **{"train.max-steps": 1, "train.optim": "adamw_torch"})
    adapter = tmp_path / "adapter.npz"
    np.savez(adapter, **{k: a.numpy() for k, a in global_arrays(tiny_model_dir, run_config).items()})
    spec = {
        "adapter": str(adapter),
        "round": {"server-round": 1, "learning-rate": 1e-3, "transport-dtype": "float32"},
        "node": {"partition-id": 0, "num-partitions": 2, "data-path": str(demo_data_file), "trainer-socket": sock},
        "run_config": run_config,
    }
    done = subprocess.run(
        [sys.executable, "-c", CLIENTAPP_ONLY, json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "steps": 1}
