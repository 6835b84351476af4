"""resume.from continues from the round the checkpoint holds: results.json may list one round more (its
checkpoint was still being written in the background), or a crash mid-swap may have left only .latest.old."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedtune.checkpoint import old_copy, save_adapter
from fedtune.config import ModelSettings
from fedtune.errors import FedTuneError
from fedtune.results import ResultsFile, RoundRecord, RunResults
from serverapp.server_app import _resume_point

SETTINGS = ModelSettings(name="unused", trust_remote_code=False, quantization=0)


def run_with(tmp_path, rounds: int, checkpointed: int) -> ResultsFile:
    results = ResultsFile(tmp_path, RunResults(run_id=7))
    for n in range(1, rounds + 1):
        record = RoundRecord(round=n, learning_rate=1e-3, budget_bytes=100 * n, sent_bytes_down=30, sent_bytes_up=30)
        record.checkpoint_written_at = 1.0 if n <= checkpointed else None
        results.add_round(record, 100 * n, 60 * n)
    state = {"layer.lora_A.weight": np.full((2, 2), float(checkpointed), np.float32)}
    save_adapter(state, SETTINGS, tmp_path / "latest", {"round": checkpointed, "budget_bytes": 100 * checkpointed})
    return results


def test_resume_starts_after_the_checkpointed_round_not_the_last_listed_one(tmp_path):
    run_with(tmp_path, rounds=2, checkpointed=1)
    previous, latest = _resume_point(str(tmp_path))
    assert [r.round for r in previous.rounds] == [1]
    assert previous.budget_bytes == 100 and previous.sent_bytes == 60
    assert latest == tmp_path / "latest"


def test_resume_reads_the_previous_checkpoint_after_a_crash_between_the_renames(tmp_path):
    run_with(tmp_path, rounds=2, checkpointed=2)
    os.replace(tmp_path / "latest", old_copy(tmp_path / "latest"))
    previous, latest = _resume_point(str(tmp_path / "results.json"))
    assert latest == old_copy(tmp_path / "latest") and previous.last_round == 2


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    ResultsFile(tmp_path, RunResults(run_id=7)).write()
    with pytest.raises(FedTuneError, match="finished no round"):
        _resume_point(str(tmp_path))
    with pytest.raises(FedTuneError, match=r"no results\.json"):
        _resume_point(str(tmp_path / "nowhere"))
