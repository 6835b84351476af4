"""The SuperLink's real state as fedtune-superlink runs it (SQLite LinkState file, message objects in
memory), for tests of fedtune's patches to Flower's state and handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def superlink_linkstate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh SqlLinkState in `tmp_path`; Flower's object store factory comes back after the test."""
    import flwr.superlink.config_loader as config_loader

    from superlink import flower_entry

    monkeypatch.setattr(config_loader, "ObjectStoreFactory", config_loader.ObjectStoreFactory)
    flower_entry.keep_objects_in_memory()
    _, state_factory = config_loader.get_objectstore_linkstate_factories(
        str(tmp_path / "state.db"), config_loader.get_federation_manager()
    )
    return state_factory.state()
