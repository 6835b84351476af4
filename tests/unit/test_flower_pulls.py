"""fedtune/flower_pulls.py: Flower's object pulls retry within a quarter second, bounded by Flower's own
PULL_MAX_TIME instead of a per-object try count; FEDTUNE_PULL_RETRY=flower keeps Flower's backoff."""

from __future__ import annotations

import pytest
from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_INITIAL_BACKOFF, PULL_MAX_TIME
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from fedtune import flower_pulls

PULLS = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)


@pytest.fixture
def restored(monkeypatch):
    """Flower's defaults come back after the test (they are this process's, shared by every test)."""
    for pull in PULLS:
        monkeypatch.setattr(pull, "__kwdefaults__", dict(pull.__kwdefaults__))


def test_pulls_retry_sooner_with_no_try_limit(restored):
    flower_pulls.retry_pulls_sooner()
    for pull in PULLS:
        defaults = pull.__kwdefaults__
        assert defaults["initial_backoff"] == flower_pulls.INITIAL_BACKOFF_S < PULL_INITIAL_BACKOFF
        assert defaults["backoff_cap"] == flower_pulls.BACKOFF_CAP_S < PULL_BACKOFF_CAP
        assert defaults["max_tries_per_object"] is None and defaults["max_time"] == PULL_MAX_TIME


def test_an_object_that_arrives_late_is_pulled(restored):
    flower_pulls.retry_pulls_sooner()
    attempts = {"late": 0}

    def pull_object(object_id: str) -> bytes:
        attempts[object_id] += 1
        if attempts[object_id] < 6:  # Flower's backoff would wait 1 + 2 + 4 + 8 + 10 s for this
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull_objects(["late"], pull_object) == {"late": b"content"}
    assert attempts["late"] == 6


def test_flower_setting_keeps_flowers_backoff(restored, monkeypatch):
    monkeypatch.setenv(flower_pulls.RETRY_ENV, "flower")
    flower_pulls.retry_pulls_sooner()
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == PULL_INITIAL_BACKOFF
