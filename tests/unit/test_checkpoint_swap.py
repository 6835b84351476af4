"""Issue 13 item 13: the checkpoint swap is safe at every instant, and the background writer loses nothing.

A crash is simulated by making the N-th file-system step of `save_adapter` raise (every rename and every
fsync is a step): whatever N, a complete checkpoint is found afterwards — the old one or the new one — and
the next save leaves exactly one folder behind."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from fedtune import checkpoint
from fedtune.checkpoint import (
    CheckpointJob,
    CheckpointWriter,
    is_complete,
    load_adapter,
    old_copy,
    read_round,
    resolve_checkpoint,
    save_adapter,
)
from fedtune.config import ModelSettings

SETTINGS = ModelSettings(name="unused", trust_remote_code=False, quantization=0)


def state(value: float) -> dict[str, np.ndarray]:
    return {"base_model.model.layer.lora_A.weight": np.full((4, 8), value, np.float32)}


class Crash(Exception):
    pass


def crashing_after(monkeypatch, steps: int) -> list[str]:
    """Make the `steps`-th rename or fsync raise (a crash at that instant); return the step log."""
    seen: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def step(name, real):
        def wrapped(*args):
            seen.append(name)
            if len(seen) == steps:
                raise Crash(name)
            return real(*args)

        return wrapped

    monkeypatch.setattr(checkpoint.os, "replace", step("replace", real_replace))
    monkeypatch.setattr(os, "fsync", step("fsync", real_fsync))
    return seen


def value_of(folder) -> float:
    return float(load_adapter(folder)["base_model.model.layer.lora_A.weight"][0, 0])


def count_steps(tmp_path) -> int:
    probe = tmp_path / "probe"
    save_adapter(state(0.0), SETTINGS, probe / "latest", {"round": 0})
    with pytest.MonkeyPatch.context() as patch:
        seen = crashing_after(patch, 10**9)
        save_adapter(state(1.0), SETTINGS, probe / "latest", {"round": 1})
    return len(seen)


def test_a_crash_at_any_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    total = count_steps(tmp_path)
    assert total >= 6  # files, folders and both renames are synced
    for n in range(1, total + 1):
        target = tmp_path / f"run-{n}" / "latest"
        save_adapter(state(1.0), SETTINGS, target, {"round": 1})
        with monkeypatch.context() as patch:
            crashing_after(patch, n)
            with pytest.raises(Crash):
                save_adapter(state(2.0), SETTINGS, target, {"round": 2})
        found = resolve_checkpoint(target)
        assert found is not None, f"crash at step {n}: no complete checkpoint"
        assert value_of(target) in (1.0, 2.0)
        assert read_round(target)["round"] == {1.0: 1, 2.0: 2}[value_of(target)]
        # the next save recovers: one complete `latest`, no .old, no staging folder
        save_adapter(state(3.0), SETTINGS, target, {"round": 3})
        assert value_of(target) == 3.0 and is_complete(target)
        assert sorted(p.name for p in target.parent.iterdir()) == ["latest"], n


def test_between_the_two_renames_resume_reads_the_previous_checkpoint(tmp_path):
    target = tmp_path / "latest"
    save_adapter(state(1.0), SETTINGS, target, {"round": 1})
    os.replace(target, old_copy(target))  # the instant after the first rename
    assert not target.exists()
    assert resolve_checkpoint(target) == old_copy(target)
    assert value_of(target) == 1.0 and read_round(target) == {"round": 1}


def test_an_incomplete_folder_is_never_taken_for_a_checkpoint(tmp_path):
    target = tmp_path / "latest"
    target.mkdir()
    (target / checkpoint.ADAPTER_WEIGHTS).write_bytes(b"half")
    assert resolve_checkpoint(target) is None
    save_adapter(state(1.0), SETTINGS, target, {"round": 1})
    assert value_of(target) == 1.0


def test_writer_runs_in_the_background_and_never_overlaps_or_loses_a_write(tmp_path, monkeypatch):
    written: list[tuple[int, float]] = []
    active = []
    real_save = checkpoint.save_adapter

    def slow_save(*args, **kwargs):
        active.append(1)
        assert len(active) == 1, "two writes in flight"
        time.sleep(0.2)
        try:
            return real_save(*args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(checkpoint, "save_adapter", slow_save)
    writer = CheckpointWriter(SETTINGS, lambda job, seconds, at: written.append((job.server_round, at)))
    started = time.perf_counter()
    writer.submit(CheckpointJob(1, state(1.0), [tmp_path / "latest"], {"round": 1}))
    assert time.perf_counter() - started < 0.15  # submit returned before the write finished
    for n in (2, 3):
        writer.submit(CheckpointJob(n, state(float(n)), [tmp_path / "latest", tmp_path / f"round-{n}"], {"round": n}))
    writer.wait()
    assert [n for n, _ in written] == [1, 2, 3]
    assert value_of(tmp_path / "latest") == 3.0 and value_of(tmp_path / "round-2") == 2.0


def test_a_failed_background_write_is_raised_not_lost(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_adapter", broken)
    writer = CheckpointWriter(SETTINGS)
    writer.submit(CheckpointJob(1, state(1.0), [tmp_path / "latest"]))
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # reported once
    assert threading.active_count() >= 1
