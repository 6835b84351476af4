"""bench/federation_timeline.py: a node's log steps are matched to the round they belong to."""

from __future__ import annotations

from bench.federation_timeline import window

# one node's Flower log steps over two rounds (epoch seconds); round 1 starts at 100, round 2 at 150
ROUND_1 = [("receiving", 100.2), ("received", 101.0), ("sending", 140.0), ("sent", 141.0)]
ROUND_2 = [("receiving", 150.2), ("received", 151.0), ("sending", 190.0), ("sent", 191.0)]


def test_each_round_gets_its_own_steps():
    events = ROUND_1 + ROUND_2
    assert window(events, 100.0, 150.0) == dict(ROUND_1)
    assert window(events, 150.0, None) == dict(ROUND_2)


def test_a_step_missing_from_the_log_is_not_taken_from_the_next_round():
    events = ROUND_1[:3] + ROUND_2  # round 1's "Sent successfully" line is not in the log
    assert window(events, 100.0, 150.0) == dict(ROUND_1[:3])
