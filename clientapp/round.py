"""The body of one training round, shared by the in-process ClientApp and the node-local warm trainer
(clientapp/warm), which keeps its `NodeCache` (model, tokenizer, data) across rounds; the in-process
ClientApp hands a fresh one (Flower starts a new process per message anyway).

`run_round` reads like the FlowerTune template's train(): data -> model -> adapter in -> train -> adapter
out -> metrics. Every stage is timed (`time-*`, seconds) and the steps a round's timeline needs are stamped
with the node's wall clock (`at-adapter-in`, `at-trained`; the ClientApp adds `at-clientapp-started` and
`at-replied`): fedtune.round_config lists the reply's metric keys, fedtune.results documents the timeline.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clientapp.trainer import (
    RoundOutcome,
    RoundTrainer,
    build_round_trainer,
    run_round_trainer,
    train_one_round,
)
from fedtune import packing
from fedtune.codecs import CodecSpec, ffa, is_lora_a
from fedtune.config import FedTuneConfig
from fedtune.dataset import load_node_dataset
from fedtune.model import (
    adapter_buffer,
    adapter_state,
    load_adapter_buffers,
    load_adapter_state,
    load_tokenizer,
    load_trainable_model,
    pick_device,
)
from fedtune.round_config import RoundConfig

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


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


def trainer_key(cfg: FedTuneConfig, node_config: dict[str, Any], round_config: RoundConfig) -> str:
    """Everything a round's trainer is built from, but the learning rate (set when it trains): a trainer
    built ahead serves a round only if this matches."""
    ffa_lora = CodecSpec.from_config(round_config.codec).ffa_lora
    return json.dumps([asdict(cfg), data_key(cfg, node_config), ffa_lora], sort_keys=True, default=str)


@dataclass
class NodeCache:
    """What a node keeps between rounds: loaded on first use, reloaded when the run's settings change."""

    model_key: str | None = None
    model: Any = None
    tokenizer: Any = None
    device: str = ""
    data_key: str | None = None
    trainset: Any = None
    skipped: int = 0
    prepared: dict[str, Any] = field(default_factory=dict)  # the tokenised dataset (trainer.py)
    next_trainer: RoundTrainer | None = None  # built ahead for the next round (`prepare_next_round`)

    def take_trainer(self, key: str) -> RoundTrainer | None:
        """The trainer built ahead, if it was built for this round's settings; any other is discarded."""
        built, self.next_trainer = self.next_trainer, None
        if built is not None and built.key != key:
            built.discard()
            built = None
        return built

    def drop_trainer(self) -> None:
        """Discard the trainer built ahead, if any (it holds the model and patches its forwards)."""
        if self.next_trainer is not None:
            self.next_trainer.discard()
            self.next_trainer = None

    def dataset(self, cfg: FedTuneConfig, node_config: dict[str, Any]) -> tuple[Any, int]:
        key = data_key(cfg, node_config)
        if self.data_key != key:
            self.trainset, self.skipped = load_node_dataset(
                cfg.dataset.name, node_config, cfg.dataset.num_partitions
            )
            self.data_key = key
            self.prepared.clear()
        return self.trainset, self.skipped

    def model_for(self, cfg: FedTuneConfig) -> tuple[Any, Any, str]:
        key = model_key(cfg)
        if self.model_key != key:
            self.drop_model()  # free the old model's memory before loading another
            self.device = pick_device()
            self.tokenizer = load_tokenizer(cfg.model)
            self.model = load_trainable_model(cfg.model, self.device)
            self.model_key = key
        return self.model, self.tokenizer, self.device

    def drop_model(self) -> None:
        self.drop_trainer()
        if self.model is None:
            return
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


def _release_paged_optimizer_state() -> None:
    """bitsandbytes' paged optimizers register their state buffers in a global list that is never emptied;
    a process that trains many rounds must drop them once a round's optimizer is gone."""
    try:
        from bitsandbytes.functional import GlobalPageManager
    except ImportError:
        return
    GlobalPageManager.get_instance().paged_tensors.clear()


# ---- adapter in / out: the wire form is fedtune/packing.py's -----------------------------------------


def adapter_in(model: Any, record: ArrayRecord, ffa_lora: FedTuneConfig | None = None) -> None:
    """Load the round's global adapter (packed or per-tensor, fp32 or bf16 bits) into the model; under
    FFA-LoRA (`ffa_lora`: the run's config) the record holds only B and A comes from the run's seed.
    A packed record goes to the model's device buffer by buffer (fedtune.model.load_adapter_buffers)."""
    import torch

    unpacked = packing.unpack(record)
    if ffa_lora is None and load_adapter_buffers(model, unpacked):
        return
    values = packing.decode(unpacked.arrays)
    # copies: the arrays are views into one received buffer, and the model keeps what it is given
    state = OrderedDict((k, torch.from_numpy(np.array(v, dtype=np.float32))) for k, v in values.items())
    if ffa_lora is not None:
        state = ffa.with_seeded_a(state, ffa_lora.model, ffa_lora.train.seed)
    load_adapter_state(model, state)


def adapter_out(model: Any, round_config: RoundConfig) -> ArrayRecord:
    """The trained adapter in the round's transport dtype and form (packed or per-tensor): cast and laid
    out on the model's device, one copy to the host (fedtune.model.adapter_buffer)."""
    b_only = CodecSpec.from_config(round_config.codec).ffa_lora  # issue 18: the frozen A never travels
    keep = (lambda key: not is_lora_a(key)) if b_only else None
    flat = adapter_buffer(model, round_config.transport_dtype, keep)
    if flat is not None:
        layout, buffer = flat
        if round_config.transport == "packed":
            return packing.pack_buffer(layout, buffer)
        return packing.to_record(packing.split_buffer(layout, buffer), round_config.transport)
    state = adapter_state(model)  # no parameter map: through peft, tensor by tensor
    if b_only:
        state = ffa.b_only(state)
    wire = packing.encode(state, round_config.transport_dtype)
    return packing.to_record(wire, round_config.transport)


# ---- the round ------------------------------------------------------------------------------------------


def run_round(
    cfg: FedTuneConfig,
    node_config: dict[str, Any],
    round_config: RoundConfig,
    global_arrays: ArrayRecord,
    cache: NodeCache,
) -> tuple[ArrayRecord, dict[str, int | float], RoundOutcome]:
    """Train the global adapter on this node's data; return the update, the reply's metrics and the
    round's details (loss history, step times)."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[f"time-{name}"] = now - mark
        mark = now

    trainset, skipped = cache.dataset(cfg, node_config)
    lap("data")

    model, tokenizer, device = cache.model_for(cfg)
    lap("model-load")

    ffa_lora = CodecSpec.from_config(round_config.codec).ffa_lora  # issue 18 (fedtune/codecs/ffa.py)
    ffa.set_a_trainable(model, not ffa_lora)
    adapter_in(model, global_arrays, cfg if ffa_lora else None)
    adapter_in_at = time.time()
    lap("adapter-in")

    built = cache.take_trainer(trainer_key(cfg, node_config, round_config))  # a warm trainer built it

    # a trainer built ahead cost this round nothing; one built now is part of the round
    setup_seconds = 0.0
    try:
        if built is None:
            built = _build(cfg, model, tokenizer, trainset, device, cache, round_config.learning_rate)
            setup_seconds = built.setup_seconds
        outcome = run_round_trainer(built, round_config.learning_rate)
    finally:
        _release_paged_optimizer_state()
    trained_at = time.time()
    mark = time.perf_counter()
    timings["time-trainer-setup"] = setup_seconds
    timings["time-train"] = outcome.seconds

    arrays = adapter_out(model, round_config)
    lap("adapter-out")

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
        "at-adapter-in": adapter_in_at,
        "at-trained": trained_at,
    }
    return arrays, metrics, outcome


def _build(
    cfg: FedTuneConfig, model: Any, tokenizer: Any, trainset: Any, device: str, cache: NodeCache, lr: float
) -> RoundTrainer:
    return build_round_trainer(
        model,
        tokenizer,
        trainset,
        cfg.train,
        device,
        cfg.model.gradient_checkpointing,
        cfg.model.gradient_checkpointing_every,
        prepared=cache.prepared,
        learning_rate=lr,
    )


def prepare_next_round(
    cfg: FedTuneConfig, node_config: dict[str, Any], round_config: RoundConfig, cache: NodeCache
) -> float:
    """Build the next round's trainer now, between rounds, on the settings of the round just trained (the
    next one usually has the same; `run_round` uses it only if so, else builds its own). Returns the seconds
    it took. The model's adapter values do not matter here: the next round writes its adapter in place
    (fedtune.model.load_adapter_buffers) and the optimizer is built when it trains."""
    started = time.perf_counter()
    trainset, _ = cache.dataset(cfg, node_config)
    model, tokenizer, device = cache.model_for(cfg)
    cache.drop_trainer()  # at most one built ahead
    ffa.set_a_trainable(model, not CodecSpec.from_config(round_config.codec).ffa_lora)
    built = _build(cfg, model, tokenizer, trainset, device, cache, round_config.learning_rate)
    built.key = trainer_key(cfg, node_config, round_config)
    cache.next_trainer = built
    return time.perf_counter() - started


WARM_UP_TRAININGS = 2  # a fresh process's first two rounds compile (the second retraces once more)
WARM_UP_ROWS = 16  # embedded rows: enough for one optimizer step of every profile's batch


def warm_up(cfg: FedTuneConfig, cache: NodeCache) -> float:
    """Before the first round (a warm trainer's preload): train WARM_UP_TRAININGS one-step rounds at learning
    rate 0 on embedded rows, through the round's own code, so the first real round finds the compiled layers
    compiled and the GPU's kernels loaded. The adapter is put back as it was, and every round builds its
    trainer afresh (seeded), so no round trains differently for it. Returns the seconds it took."""
    import torch
    from datasets import Dataset

    from fedtune.dataset import to_conversations
    from fedtune.embedded import demo_rows

    started = time.perf_counter()
    model, tokenizer, device = cache.model_for(cfg)
    rows, _ = to_conversations(Dataset.from_list(demo_rows(WARM_UP_ROWS)))
    settings = dataclasses.replace(cfg.train, max_steps=1)
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}
    try:
        for _ in range(WARM_UP_TRAININGS):
            try:  # no `prepared`: the warm-up rows must not stand in for the node's tokenised data
                train_one_round(
                    model, tokenizer, rows, settings, 0.0, device, cfg.model.gradient_checkpointing,
                    cfg.model.gradient_checkpointing_every,
                )
            finally:
                _release_paged_optimizer_state()
    finally:  # values and dtype as before: round 1 then starts as it would in a fresh process
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.data = saved[name]
    return time.perf_counter() - started
