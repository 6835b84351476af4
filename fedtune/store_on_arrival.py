"""A SuperNode stores each object of a downloaded message the moment it arrives, not after the last one.

Flower 1.42's SuperNode (`flwr.supernode.start_client_internal._pull_and_store_message`) lists the round's
message in its state, which starts the ClientApp, then pulls every object of the message into a dict and
puts them into its object store only once the last one is in. The ClientApp's pulls from the SuperNode wait
all that time (fedtune.object_waits), then copy the whole adapter again over the local API: two transfers
one after the other. Here each object goes into the store as it arrives (the store checks its hash, as
before), so the ClientApp's pull of a chunk returns as soon as the SuperNode has it and the two transfers
overlap. A download that fails midway fails as Flower's does: the message and its objects are deleted and
the task is marked failed.

Applied by `supernode/flower_entry.py`; FEDTUNE_STORE_ON_ARRIVAL=0 keeps Flower's order.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

from fedtune.patching import wrap_once
from fedtune.runtime_env import env_tristate

ENV = "FEDTUNE_STORE_ON_ARRIVAL"
_PATCHED = "_fedtune_store_on_arrival"

# the object store of the message being pulled, for the pull_objects call inside _pull_and_store_message
_receiving = threading.local()


def _binding_the_store(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(pull_and_store)

    def pull_and_store_message(*args: Any, **kwargs: Any) -> Any:
        _receiving.store = signature.bind(*args, **kwargs).arguments["object_store"]
        try:
            return pull_and_store(*args, **kwargs)
        finally:
            _receiving.store = None

    return pull_and_store_message


def _storing_each(pull_objects: Callable[..., dict[str, bytes]]) -> Callable[..., dict[str, bytes]]:
    def pull_objects_into_store(
        object_ids: list[str], pull_object_fn: Callable[[str], bytes], **kwargs: Any
    ) -> dict[str, bytes]:
        store = getattr(_receiving, "store", None)
        if store is None:  # another caller of pull_objects: Flower's behaviour
            return pull_objects(object_ids, pull_object_fn, **kwargs)

        def pull_and_put(object_id: str) -> bytes:
            content = pull_object_fn(object_id)
            store.put(object_id, content)  # raises on a hash mismatch: the download fails, as Flower's
            return content

        pull_objects(object_ids, pull_and_put, **kwargs)
        return {}  # every object is in the store already: nothing left for the caller to put

    return pull_objects_into_store


def enabled() -> bool:
    return env_tristate(ENV) is not False  # on unless set to 0/false


def store_downloads_on_arrival() -> bool:
    """Patch this process's SuperNode loop (idempotent). False when FEDTUNE_STORE_ON_ARRIVAL=0."""
    if not enabled():
        return False
    import flwr.supernode.start_client_internal as internal

    wrap_once(internal, "_pull_and_store_message", _binding_the_store, _PATCHED)
    wrap_once(internal, "pull_objects", _storing_each, _PATCHED)
    return True
