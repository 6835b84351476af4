"""Global adapters on disk as standard PEFT folders (adapter_config.json + adapter_model.safetensors),
written atomically: a crash leaves the previous checkpoint, never a half-written one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import ModelSettings

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ROUND_FILE = "fedtune_round.json"


def save_adapter(
    state: OrderedDict[str, torch.Tensor],
    settings: ModelSettings,
    target: Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `state` as a PEFT adapter folder at `target` (replacing it atomically)."""
    from safetensors.torch import save_file

    from fedtune.model import lora_config

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = lora_config(settings)
        config.base_model_name_or_path = settings.name
        config.save_pretrained(staging)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(staging / ADAPTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        (staging / ROUND_FILE).write_text(json.dumps(extra or {}, indent=2))
        staging.chmod(0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_adapter(path: Path) -> OrderedDict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return OrderedDict(load_file(str(Path(path) / ADAPTER_WEIGHTS)))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    os.replace(tmp, path)
