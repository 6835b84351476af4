"""Flower's object pulls retry within a quarter second instead of backing off to 10 s.

Flower lists a message before all its objects are there: a SuperNode stores a message's metadata, which
hands the ClientApp its task, and only then downloads the chunks (putting them in its store when the last
one has arrived); the SuperLink lists a reply as soon as the SuperNode starts uploading it. A pull of an
object not there yet waits 1 s, 2 s, 4 s … up to 10 s (`flwr.supercore.constant.PULL_INITIAL_BACKOFF`,
`PULL_BACKOFF_CAP`), so a ClientApp that is ready early (fedtune.prestart) or a ServerApp that polls for
replies finds a 77 MB adapter up to ~2 s after it arrived, every round (bench/federation.py, "SuperNode
received → ClientApp started"). Retrying from 50 ms, doubling to at most 250 ms, bounds that wait to a
quarter second, for a few more small requests to the local SuperNode or SuperLink while a transfer runs.

The per-object retry limit goes with it (500 tries would be ~2 min at 250 ms, not the ~80 min they are at
Flower's backoff): the whole pull stays bounded by Flower's own `PULL_MAX_TIME` (2 h), so a slow link
fails no sooner than before.
"""

from __future__ import annotations

import os

RETRY_ENV = "FEDTUNE_PULL_RETRY"  # "flower": keep Flower's backoff (bench.federation --flower-transfer)
INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.25
PULL_SETTINGS = {"initial_backoff", "backoff_cap", "max_tries_per_object"}


def retry_pulls_sooner() -> None:
    """Set the pull defaults of this process's Flower (every caller uses them: the SuperNode's download,
    the ClientApp's pull from its SuperNode, the ServerApp's pull of replies). Idempotent."""
    if os.environ.get(RETRY_ENV, "").strip().lower() == "flower":
        return
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = pull.__kwdefaults__
        if defaults is None or not set(defaults) >= PULL_SETTINGS:
            raise RuntimeError(f"flwr's {pull.__name__} has no backoff defaults to set: flwr changed")
        defaults.update(
            initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S, max_tries_per_object=None
        )
