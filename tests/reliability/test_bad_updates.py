"""Bad updates end to end: tests/reliability/badapp is our ServerApp with a ClientApp that sends NaN, Inf,
wrong keys, wrong shapes, a wrong dtype, oversize arrays, zero and negative example counts, or crashes,
by (round, partition). Every bad reply must be rejected before aggregation and counted by reason; while
all replies are bad the global adapter must stay bit-for-bit what it was."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedtune.config import FedTuneConfig
from tests.reliability.badapp.badclient import EXPECTED, HONEST_DELTA, SCHEDULE
from tests.reliability.conftest import BADAPP, small_config
from tests.reliability.helpers import load_state, read_results, report, run_log, states_equal

pytestmark = pytest.mark.slow


def test_every_kind_of_bad_update_is_rejected_and_counted(auth_federation, tiny_model_dir):
    import torch

    from fedtune.model import initial_adapter_state

    fed = auth_federation
    rounds = len(SCHEDULE)
    config = small_config(tiny_model_dir, **{"num-server-rounds": rounds})
    run_id = fed.submit(BADAPP, overrides=config)
    info = fed.wait_for_run(run_id, 900, poll=5)
    run_dir = fed.run_dir(run_id)
    results = read_results(run_dir)
    assert info["status"] == "finished:completed", results.get("error")
    assert [r["round"] for r in results["rounds"]] == list(range(1, rounds + 1))

    node_of = {p: fed.registered_keys[f"supernode-{p}"] for p in range(2)}
    seen: Counter[str] = Counter()
    for record in results["rounds"]:
        expected = {node_of[p]: EXPECTED[kind] for p, kind in enumerate(SCHEDULE[record["round"]])}
        want_rejected = {str(n): r for n, r in expected.items() if r not in (None, "failed")}
        assert record["rejected"] == want_rejected, record
        assert record["failed"] == sorted(n for n, r in expected.items() if r == "failed"), record
        assert record["aggregated"] == any(r is None for r in expected.values())
        seen.update(record["rejected"].values())
        seen.update("failed" for _ in record["failed"])
    want = Counter(r for kinds in SCHEDULE.values() for r in (EXPECTED[k] for k in kinds) if r is not None)
    assert seen == want

    # all rejected in rounds 1-4: the global adapter never moved
    cfg = FedTuneConfig.from_run_config(config)
    initial = initial_adapter_state(cfg.model, cfg.train.seed)
    for n in range(1, rounds):
        assert states_equal(load_state(run_dir / "checkpoints" / f"round-{n:04d}"), dict(initial)), n
    # round 5: the only acceptable reply (honest: global + delta, 1 example) is the new global adapter
    final = load_state(run_dir / "adapter")
    for key, value in initial.items():
        expected = torch.from_numpy(value.numpy().astype(np.float32) + HONEST_DELTA)
        assert torch.equal(final[key], expected), key

    # the log says why, per node
    log = run_log(fed, run_id)
    for reason in set(want) - {"failed"}:
        assert f": {reason}" in log, reason
    # bytes that arrived count, rejected or not; a crashed node sent nothing up
    per_message = results["rounds"][0]["bytes_down"] // 2
    assert results["rounds"][0]["bytes_up"] == 2 * per_message  # NaN / Inf: same size
    assert results["rounds"][3]["bytes_up"] == 2 * per_message  # bad example counts
    assert results["rounds"][4]["bytes_up"] == per_message  # honest + crash
    report(
        "bad updates from a misbehaving ClientApp", rejected_by_reason=dict(seen), rounds=rounds,
        global_adapter_unchanged_while_all_rejected=True,
    )
