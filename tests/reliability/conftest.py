"""One authenticated TLS federation (SuperLink + 2 SuperNodes with registered ECDSA keys) shared by the
fault-injection tests, which run in file order against it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.federation import LocalFederation
from tests.conftest import tiny_run_config
from tests.reliability.helpers import REPORT

BADAPP = Path(__file__).resolve().parent / "badapp"


def small_config(model_dir: Path, **overrides: object) -> dict[str, object]:
    """2 rounds × 2 steps on the tiny model: the smallest run that has a round before the one in flight."""
    return tiny_run_config(
        model_dir,
        **{
            "num-server-rounds": 2,
            "train.max-steps": 2,
            "train.save-every-round": 1,
            "strategy.round-timeout": 600,
            **overrides,
        },
    )


@pytest.fixture(scope="session")
def auth_federation(tmp_path_factory):
    fed = LocalFederation(
        tmp_path_factory.mktemp("reliability"), extra_env={"OMP_NUM_THREADS": "1"}, supernode_auth=True
    )
    try:
        yield fed.start(num_supernodes=2)
    finally:
        fed.stop()


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("reliability: faults injected and what survived")
        for entry in REPORT:
            terminalreporter.write_line(str(entry))
