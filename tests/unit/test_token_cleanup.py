"""fedtune/token_cleanup.py on the SuperLink's real SQLite LinkState: a burst of run-status checks (one per
object request) sweeps the task tokens once per interval, not once each; a claim whose heartbeat expired is
refused at once all the same, and swept (its task back to pending) at the next sweep; 0 keeps Flower's."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from flwr.supercore.corestate import sql_corestate
from flwr.supercore.corestate.sql_corestate import SqlCoreState

from fedtune import token_cleanup
from fedtune.errors import FedTuneError
from tests.superlink_state import superlink_linkstate


@pytest.fixture
def state(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", SqlCoreState._cleanup_expired_task_tokens)
    return superlink_linkstate(tmp_path, monkeypatch)


def counting_sweeps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sweeps: list[int] = []
    real = SqlCoreState._cleanup_expired_task_tokens

    def sweep(self: Any) -> None:
        sweeps.append(1)
        real(self)

    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", sweep)
    return sweeps


def a_claimed_task(state: Any) -> tuple[int, int, str]:
    from flwr.supercore.constant import NOOP_FEDERATION_ID

    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    task_id = state.get_tasks(run_ids=[run_id])[0].task_id
    token = state.claim_task(task_id)
    assert token and state.get_task_by_token(token) is not None
    return run_id, task_id, token


def test_status_checks_sweep_once_per_interval_and_an_expired_claim_is_still_refused(state, monkeypatch):
    monkeypatch.setenv(token_cleanup.CLEANUP_ENV, "0.5")
    run_id, task_id, token = a_claimed_task(state)
    sweeps = counting_sweeps(monkeypatch)
    assert token_cleanup.sweep_tokens_once_a_second() == 0.5
    for _ in range(50):  # a round's object requests, each checking its run's status
        assert state.get_run_status({run_id})[run_id].status == "starting"
    assert len(sweeps) == 1

    later = sql_corestate.now() + datetime.timedelta(seconds=31)  # past the claim's 30 s heartbeat
    monkeypatch.setattr(sql_corestate, "now", lambda: later)
    assert state.get_task_by_token(token) is None  # refused on its own, swept or not
    state.get_run_status({run_id})  # within the interval: no sweep yet
    assert len(sweeps) == 1 and state.get_tasks(task_ids=[task_id])[0].status.status == "starting"
    time.sleep(0.6)
    assert state.get_run_status({run_id})[run_id].status == "pending"  # swept: back to pending
    assert len(sweeps) == 2


def test_zero_sweeps_on_every_call_as_flower_does(state, monkeypatch):
    monkeypatch.setenv(token_cleanup.CLEANUP_ENV, "0")
    run_id, _, _ = a_claimed_task(state)
    sweeps = counting_sweeps(monkeypatch)
    assert token_cleanup.sweep_tokens_once_a_second() == 0.0
    for _ in range(5):
        state.get_run_status({run_id})
    assert len(sweeps) == 5


def test_throttle_is_due_once_per_interval():
    now = [10.0]
    throttle = token_cleanup.Throttle(1.0, clock=lambda: now[0])
    assert throttle.due() and not throttle.due()
    now[0] += 0.99
    assert not throttle.due()
    now[0] += 0.02
    assert throttle.due()


@pytest.mark.parametrize("raw", ["often", "-1", "11"])
def test_a_bad_interval_is_one_line(monkeypatch, raw):
    monkeypatch.setenv(token_cleanup.CLEANUP_ENV, raw)
    with pytest.raises(FedTuneError, match=f"FEDTUNE_TOKEN_CLEANUP_SECONDS must be .*{raw}"):
        token_cleanup.cleanup_seconds()
