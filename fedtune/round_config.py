"""The round contract: what the ServerApp tells every sampled node about one training round.

Written once by the strategy (`RoundConfig.to_config_record`), read once by the ClientApp
(`RoundConfig.from_config_record`); the warm trainer's socket carries the same object as a dict
(`to_dict` / `from_dict`). The keys on the wire are Flower's kebab-case config names; `server-round` is the
key Flower's FedAvg itself writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from fedtune.config import TRANSPORT_DTYPES, TRANSPORTS
from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    from flwr.app import ConfigRecord

CODEC_PREFIX = "codec-"  # issue 18 (fedtune/codecs): its CodecSpec.to_config() keys ride along untouched

# The reply (ClientApp -> ServerApp): RecordDict {"arrays": ArrayRecord, "metrics": MetricRecord} and nothing
# else. Its metric keys are a closed set of finite scalars: REQUIRED ones must be there, the others may be;
# any other key is a rejection (serverapp/validation.py).
REPLY_ARRAYS_KEY = "arrays"
REPLY_METRICS_KEY = "metrics"
REPLY_REQUIRED_METRICS = ("num-examples", "train-loss")
REPLY_TRAIN_METRICS = (
    "num-examples", "train-loss", "train-steps", "train-seconds", "train-tokens", "tokens-per-second",
    "peak-memory-bytes", "skipped-rows", "partition-id",
)
# seconds each stage of clientapp.round.run_round took
REPLY_STAGE_METRICS = (
    "time-data", "time-model-load", "time-adapter-in", "time-trainer-setup", "time-train", "time-adapter-out",
)
# the node's wall clock (time.time()) at each step: fedtune.results.NodeTimeline
REPLY_STAMP_METRICS = ("at-clientapp-started", "at-adapter-in", "at-trained", "at-replied")
REPLY_METRICS = REPLY_TRAIN_METRICS + REPLY_STAGE_METRICS + REPLY_STAMP_METRICS


@dataclass(frozen=True)
class RoundConfig:
    server_round: int
    learning_rate: float
    transport_dtype: str = "float32"  # dtype of adapter arrays on the wire (both directions)
    transport: str = "packed"  # how the adapter crosses the hops: fedtune.packing (both directions)
    # the codec's settings (`codec-*` keys, fedtune.codecs.CodecSpec.to_config()); empty = no codec
    codec: dict[str, Any] = field(default_factory=dict)
    sent_at: float = 0.0  # the ServerApp's wall clock (time.time()) when it built the message

    def __post_init__(self) -> None:
        if isinstance(self.server_round, bool) or not isinstance(self.server_round, int):
            raise FedTuneError(f"round config server-round={self.server_round!r}: expected an integer")
        if self.server_round < 1:
            raise FedTuneError(f"round config server-round={self.server_round}: must be >= 1")
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise FedTuneError(f"round config learning-rate={self.learning_rate!r}: must be finite, >= 0")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise FedTuneError(
                f"round config transport-dtype={self.transport_dtype!r}: must be one of {TRANSPORT_DTYPES}"
            )
        if self.transport not in TRANSPORTS:
            raise FedTuneError(f"round config transport={self.transport!r}: must be one of {TRANSPORTS}")
        stray = [k for k in self.codec if not k.startswith(CODEC_PREFIX)]
        if stray:
            raise FedTuneError(f"round config: codec key {stray[0]!r} must start with {CODEC_PREFIX!r}")

    # ---- wire form -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = {_wire(f.name): getattr(self, f.name) for f in fields(self) if f.name != "codec"}
        return {**values, **self.codec}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RoundConfig:
        known = {_wire(f.name): f for f in fields(cls) if f.name != "codec"}
        codec = {k: v for k, v in values.items() if k.startswith(CODEC_PREFIX)}
        values = {k: v for k, v in values.items() if k not in codec}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise FedTuneError(
                f"round config: unknown key {unknown[0]!r} (server and client versions differ?)"
            )
        missing = [k for k in ("server-round", "learning-rate") if k not in values]
        if missing:
            raise FedTuneError(f"round config: missing key {missing[0]!r}")
        kwargs: dict[str, Any] = {"codec": codec}
        for key, value in values.items():
            field = known[key]
            try:
                kwargs[field.name] = _COERCE[field.name](value)
            except (TypeError, ValueError):
                raise FedTuneError(f"round config {key}={value!r}: wrong type") from None
        return cls(**kwargs)

    def to_config_record(self) -> ConfigRecord:
        from flwr.app import ConfigRecord

        return ConfigRecord(self.to_dict())

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundConfig:
        return cls.from_dict(dict(record))


def _wire(name: str) -> str:
    return name.replace("_", "-")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


_COERCE = {
    "server_round": _int,
    "learning_rate": _float,
    "transport_dtype": _str,
    "transport": _str,
    "sent_at": _float,
}
