"""Global adapters on disk as standard PEFT folders (adapter_config.json + adapter_model.safetensors +
fedtune_round.json), written so that a crash at any instant leaves a complete checkpoint to resume from.

What is guaranteed (`save_adapter(state, settings, target)`), on a POSIX file system that honours fsync:
- A folder is *complete* when it holds all three files; fedtune_round.json is written last, and every file
  is fsynced before the folder is renamed into place.
- The new checkpoint is built in a hidden staging folder beside `target`, fsynced with its files, swapped
  in by two renames: `target` -> `.<name>.old`, staging -> `target`; the parent folder is fsynced after each.
  At every instant `target` or `.<name>.old` is a complete checkpoint (the old one only between the two
  renames, i.e. after a crash right there); `resolve_checkpoint(target)` returns whichever is complete,
  preferring `target`. A leftover staging folder is never read and is removed by the next save.
- When save_adapter returns, `target` is the new checkpoint and durable.

`CheckpointWriter` runs these writes on one background thread so a round does not wait for the disk: at most
one write is in flight (`submit` first waits for the previous one), a failed write is raised by the next
`submit` or by `wait()`, and the ServerApp waits for the last one before it reports the run finished. So
results.json can list a round whose checkpoint is still being written; resume therefore continues from the
round recorded in the checkpoint itself (`read_round`), not from results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.atomic import fsync_dir, write_text
from fedtune.config import ModelSettings

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ROUND_FILE = "fedtune_round.json"
COMPLETE = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ROUND_FILE)


def _as_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            value = value.detach().cpu().float().numpy()
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def is_complete(folder: Path) -> bool:
    return all((Path(folder) / name).is_file() for name in COMPLETE)


def old_copy(target: Path) -> Path:
    return Path(target).with_name(f".{Path(target).name}.old")


def resolve_checkpoint(target: Path) -> Path | None:
    """The complete checkpoint at `target`, or the previous one a crash mid-swap left, or None."""
    for candidate in (Path(target), old_copy(target)):
        if is_complete(candidate):
            return candidate
    return None


def save_adapter(
    state: Mapping[str, torch.Tensor | np.ndarray],
    settings: ModelSettings,
    target: Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `state` (float32) as a PEFT adapter folder at `target`, swapped in crash-safely (see above)."""
    from safetensors.numpy import save_file

    from fedtune.model import lora_config

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}-*"):  # staging of a crashed writer
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = lora_config(settings)
        config.base_model_name_or_path = settings.name
        config.save_pretrained(str(staging))
        save_file(_as_numpy(state), str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            _fsync_file(staging / name)
        write_text(staging / ROUND_FILE, json.dumps(extra or {}, indent=2))  # last: completes it
        staging.chmod(0o755)
        fsync_dir(staging)
        old = old_copy(target)
        if target.exists():
            if is_complete(target) or not is_complete(old):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            else:  # target is a broken leftover and .old the good one: keep .old
                shutil.rmtree(target)
            fsync_dir(target.parent)
        os.replace(staging, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_adapter(path: Path) -> OrderedDict[str, torch.Tensor]:
    """The adapter tensors of the checkpoint at `path` (or of the previous one, see resolve_checkpoint)."""
    from safetensors.torch import load_file

    folder = resolve_checkpoint(Path(path)) or Path(path)
    return OrderedDict(load_file(str(folder / ADAPTER_WEIGHTS)))


def read_round(path: Path) -> dict[str, Any]:
    """fedtune_round.json of the checkpoint at `path` ({"round": n, "budget_bytes": ...})."""
    folder = resolve_checkpoint(Path(path)) or Path(path)
    return dict(json.loads((folder / ROUND_FILE).read_text()))


# ---- off the round's critical path ----------------------------------------------------------------


@dataclass
class CheckpointJob:
    server_round: int
    state: Mapping[str, np.ndarray]  # not modified after submit (each round aggregates into new arrays)
    targets: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)


Done = Callable[[CheckpointJob, float, float], None]  # (job, seconds it took, time.time() when written)


class CheckpointWriter:
    def __init__(self, settings: ModelSettings, on_written: Done | None = None) -> None:
        self.settings = settings
        self.on_written = on_written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: CheckpointJob) -> None:
        self.wait()  # never two in flight, never one lost
        self._thread = threading.Thread(
            target=self._write, args=(job,), name=f"checkpoint-{job.server_round}", daemon=False
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, job: CheckpointJob) -> None:
        started = time.perf_counter()
        try:
            for target in job.targets:
                save_adapter(job.state, self.settings, target, job.extra)
            if self.on_written is not None:
                self.on_written(job, time.perf_counter() - started, time.time())
        except BaseException as err:  # handed to the main thread by wait()
            self._error = err
