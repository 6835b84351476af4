"""The body of one training round, shared by the in-process ClientApp and the node-local warm trainer
(supernode/trainer_service.py), which keeps a `NodeCache` (model, tokenizer, data) across rounds.

Every stage is timed; the timings go into the reply's metrics (`time-*`, seconds) so a run's results show
where a SuperNode's round went.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from clientapp.trainer import RoundOutcome, train_one_round
from fedtune.config import FedTuneConfig
from fedtune.dataset import load_node_dataset
from fedtune.model import (
    adapter_state,
    arrays_to_state,
    load_adapter_state,
    load_tokenizer,
    load_trainable_model,
    pick_device,
    state_to_arrays,
)

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


@dataclass
class NodeCache:
    """What a long-lived trainer keeps between rounds."""

    model_key: str | None = None
    model: Any = None
    tokenizer: Any = None
    device: str = ""
    data_key: str | None = None
    trainset: Any = None
    skipped: int = 0
    prepared: dict[str, Any] = field(default_factory=dict)  # the tokenised dataset (trainer.py)

    def drop_model(self) -> None:
        self.model = self.tokenizer = None
        self.model_key = None
        self.prepared.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is always there where models load
            pass


# Settings a loaded model can switch between rounds (trainer.py applies them): not part of its identity.
_PER_ROUND_MODEL_SETTINGS = ("gradient_checkpointing", "gradient_checkpointing_every", "transport_dtype")


def model_key(cfg: FedTuneConfig) -> str:
    """Everything that decides the loaded, quantised model (not the adapter values)."""
    settings = {k: v for k, v in asdict(cfg.model).items() if k not in _PER_ROUND_MODEL_SETTINGS}
    return json.dumps(settings, sort_keys=True)


def data_key(cfg: FedTuneConfig, node_config: dict[str, Any]) -> str:
    return json.dumps(
        [cfg.dataset.name, cfg.dataset.num_partitions, sorted((k, str(v)) for k, v in node_config.items())]
    )


def _release_paged_optimizer_state() -> None:
    """bitsandbytes' paged optimizers register their state buffers in a global list that is never emptied;
    a process that trains many rounds must drop them once a round's optimizer is gone."""
    try:
        from bitsandbytes.functional import GlobalPageManager
    except ImportError:
        return
    GlobalPageManager.get_instance().paged_tensors.clear()


def run_round(
    cfg: FedTuneConfig,
    node_config: dict[str, Any],
    server_round: int,
    learning_rate: float,
    transport_dtype: str,
    global_arrays: ArrayRecord,
    cache: NodeCache | None = None,
) -> tuple[ArrayRecord, dict[str, int | float], RoundOutcome]:
    """Train the global adapter on this node's data; return the update, the reply's metrics and the
    round's details (loss history, step times)."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    dkey = data_key(cfg, node_config)
    if cache is not None and cache.data_key == dkey:
        trainset, skipped = cache.trainset, cache.skipped
    else:
        trainset, skipped = load_node_dataset(cfg.dataset.name, node_config, cfg.dataset.num_partitions)
        if cache is not None:
            cache.data_key, cache.trainset, cache.skipped = dkey, trainset, skipped
            cache.prepared.clear()
    lap("time-data")

    mkey = model_key(cfg)
    if cache is not None and cache.model_key == mkey:
        model, tokenizer, device = cache.model, cache.tokenizer, cache.device
    else:
        if cache is not None:
            cache.drop_model()  # free the old model's memory before loading another
        device = pick_device()
        tokenizer = load_tokenizer(cfg.model)
        model = load_trainable_model(cfg.model, device)
        if cache is not None:
            cache.model_key, cache.model, cache.tokenizer, cache.device = mkey, model, tokenizer, device
    lap("time-model-load")

    load_adapter_state(model, arrays_to_state(global_arrays))
    lap("time-adapter-in")

    try:
        outcome = train_one_round(
            model,
            tokenizer,
            trainset,
            cfg.train,
            learning_rate,
            device,
            cfg.model.gradient_checkpointing,
            cfg.model.gradient_checkpointing_every,
            prepared=cache.prepared if cache is not None else None,
        )
    finally:
        if cache is not None:
            _release_paged_optimizer_state()
    mark = time.perf_counter()
    timings["time-trainer-setup"] = outcome.setup_seconds
    timings["time-train"] = outcome.seconds

    arrays = state_to_arrays(adapter_state(model), transport_dtype)
    lap("time-adapter-out")

    metrics: dict[str, int | float] = {
        "num-examples": len(trainset),
        "train-loss": outcome.train_loss,
        "train-steps": outcome.steps,
        "train-seconds": outcome.seconds,
        "train-tokens": outcome.tokens,
        "tokens-per-second": outcome.tokens_per_second,
        "peak-memory-bytes": outcome.peak_memory_bytes,
        "skipped-rows": skipped,
        "partition-id": int(node_config.get("partition-id", -1)),
        **timings,
    }
    return arrays, metrics, outcome
