"""superlink/flower_entry.py: with FEDTUNE_OBJECT_STORE=memory (the default) Flower's own config loader gives
the SuperLink the in-memory object store beside its SQLite state; `database` leaves Flower's choice alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from superlink import flower_entry

PROBE = """
import sys
import flwr.superlink.config_loader as config_loader
from superlink import flower_entry
if sys.argv[2] == "memory":
    flower_entry.keep_objects_in_memory()
store_factory, state_factory = config_loader.get_objectstore_linkstate_factories(
    sys.argv[1], config_loader.get_federation_manager())
state = state_factory.state()
print(type(store_factory.store()).__name__, type(state).__name__, state_factory.objectstore_factory is store_factory)
"""


@pytest.mark.parametrize(("mode", "store"), [("memory", "InMemoryObjectStore"), ("database", "SqlObjectStore")])
def test_the_object_store_follows_the_setting_and_the_state_stays_in_sqlite(tmp_path, mode, store):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "state.db"), mode],
        capture_output=True, text=True, timeout=120,
        env={"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [store, "SqlLinkState", "True"]  # the LinkState uses that same store
    assert (tmp_path / "state.db").is_file()  # runs, node keys and logs: still the file


def test_a_bad_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(flower_entry.OBJECT_STORE_ENV, "disk")
    with pytest.raises(SystemExit, match="FEDTUNE_OBJECT_STORE must be one of memory, database, got 'disk'"):
        flower_entry.object_store()
    monkeypatch.delenv(flower_entry.OBJECT_STORE_ENV)
    assert flower_entry.object_store() == "memory"
