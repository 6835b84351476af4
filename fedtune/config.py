"""One source of truth for a run: the Flower run config (pyproject `[tool.flwr.app.config]` plus
`--run-config` overrides) parsed into a typed, validated `FedTuneConfig`.

Flower hands the run config over flattened (`model.lora.r = 16`); every key must be known here,
and every bad value fails with one line naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedtune.accounting import LEADERBOARD_BUDGET_LIMIT_MB
from fedtune.codecs import CODECS, CodecSpec
from fedtune.errors import FedTuneError

QUANTIZATION_BITS = (0, 4, 8)  # 0 = no quantization (bf16/fp32 base)
TRANSPORT_DTYPES = ("float32", "bfloat16")
# bitsandbytes 4-bit data types; fp4 is `BitsAndBytesConfig(load_in_4bit=True)`'s (the FlowerTune template)
QUANT_TYPES = ("fp4", "nf4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PROMPT_FORMATS = ("flowertune", "chat")
# how the adapter crosses every hop (fedtune/packing.py): a few large arrays + manifest, or one per tensor
TRANSPORTS = ("packed", "per-tensor")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.075  # the FlowerTune template's LoraConfig(lora_dropout=0.075)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelSettings:
    name: str = "internlm/internlm3-8b-instruct"
    trust_remote_code: bool = True
    quantization: int = 4
    # 4-bit data type and the dtype 4-bit layers compute in; fp4 + float32 = the template's
    # BitsAndBytesConfig(load_in_4bit=True). float32 compute also trains without autocast and keeps the
    # LoRA weights in float32, as the template does; bfloat16 turns on bf16 mixed precision on a GPU.
    quant_type: str = "fp4"
    compute_dtype: str = "float32"
    # the hub revision (branch, tag or commit) of the model, passed to every from_pretrained; "" = default
    revision: str = ""
    gradient_checkpointing: bool = True
    # checkpoint every n-th decoder layer only (1 = all, the reference); larger trades memory for speed
    gradient_checkpointing_every: int = 1
    lora: LoraSettings = field(default_factory=LoraSettings)
    # dtype of adapter arrays on the wire; the server always aggregates in float32
    transport_dtype: str = "float32"


@dataclass(frozen=True)
class TrainSettings:
    seq_length: int = 512
    optim: str = "paged_adamw_8bit"
    learning_rate_max: float = 5e-5
    learning_rate_min: float = 1e-6
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    num_train_epochs: int = 3
    max_steps: int = 10  # per round; supersedes num_train_epochs, as in the FlowerTune template
    logging_steps: int = 1
    seed: int = 42
    save_every_round: int = 5
    # "flowertune": the template's Alpaca text and loss mask (clientapp/flowertune_format.py);
    # "chat": the tokenizer's chat template, trl masking the prompt (and appending EOS)
    prompt_format: str = "flowertune"
    packing: bool = False
    # padding-free micro-batches: the batch's samples are concatenated into one row (same samples and
    # loss as the padded batch, no padding compute); see docs/performance.md
    padding_free: bool = False
    # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) where the liger-kernel package is installed
    liger_kernel: bool = False
    # torch.compile each decoder layer (regional compilation: all layers share one compiled graph); a warm
    # trainer compiles once per SuperNode, an in-process ClientApp once per round
    compile_layers: bool = False
    # k-bit models: keep the non-quantised weights (norms, embeddings, LM head) in fp32, as peft's
    # prepare_model_for_kbit_training leaves them (the reference); false runs them in the compute dtype
    upcast_non_quantized: bool = True


@dataclass(frozen=True)
class StrategySettings:
    fraction_train: float = 0.1
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    # a reply claiming more training examples is refused (FedAvg weights by it; serverapp/validation.py)
    max_num_examples: int = 1_000_000
    # a reply further than this x max(||global||, 1) from the global adapter is refused
    max_update_ratio: float = 2.0


@dataclass(frozen=True)
class DatasetSettings:
    name: str = "flwrlabs/alpaca-gpt4"
    num_partitions: int = 20


@dataclass(frozen=True)
class CommSettings:
    transport: str = "packed"
    # adapter codecs (fedtune/codecs, docs/communication.md); the defaults send float32, as the reference
    codec: str = "none"  # node -> server, and server -> node unless download_codec is set
    download_codec: str = ""  # "" = the same as codec
    block_size: int = 64  # values per quantisation scale (int8/int4/nf4)
    ffa_lora: bool = False  # FFA-LoRA: A frozen at its seeded init everywhere, only B trained and sent

    def spec(self) -> CodecSpec:
        return CodecSpec(self.codec, self.download_codec or self.codec, self.block_size, self.ffa_lora)


@dataclass(frozen=True)
class FedTuneConfig:
    num_server_rounds: int = 10
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    comm: CommSettings = field(default_factory=CommSettings)
    output_dir: str = "outputs"
    budget_limit_mb: float = LEADERBOARD_BUDGET_LIMIT_MB
    resume_from: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedTuneConfig:
        return parse_run_config(run_config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def learning_rate(self, server_round: int) -> float:
        """Cosine decay across rounds (FlowerTune's schedule), constant within a round."""
        t = self.train
        progress = min(max(server_round, 0), self.num_server_rounds) / self.num_server_rounds
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.learning_rate_min + (t.learning_rate_max - t.learning_rate_min) * cosine


# ---- parsing -------------------------------------------------------------------------------

Check = Callable[[Any], bool]


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _positive_fraction(v: Any) -> bool:
    return 0.0 < v <= 1.0


def _csv_names(value: Any) -> tuple[str, ...]:
    names = tuple(s.strip() for s in str(value).split(",") if s.strip())
    if not names:
        raise ValueError("empty list")
    return names


@dataclass(frozen=True)
class _Key:
    path: tuple[str, ...]  # where the value lands in FedTuneConfig
    kind: type
    check: Check | None = None
    rule: str = ""
    convert: Callable[[Any], Any] | None = None


# run-config key -> destination, type and rule. The keys are the FlowerTune template's names.
KEYS: dict[str, _Key] = {
    "num-server-rounds": _Key(("num_server_rounds",), int, _positive, "> 0"),
    # 0 would sample no node and silently train nothing
    "strategy.fraction-train": _Key(
        ("strategy", "fraction_train"), float, _positive_fraction, "in (0, 1] (0 trains no node)"
    ),
    # the ClientApp answers train messages only: evaluation runs after training (`fedtune eval`)
    "strategy.fraction-evaluate": _Key(
        ("strategy", "fraction_evaluate"), float, lambda v: v == 0,
        "0 (the fedtune ClientApp does no federated evaluation; score adapters with `fedtune eval`)",
    ),
    "strategy.min-train-nodes": _Key(("strategy", "min_train_nodes"), int, _positive, "> 0"),
    "strategy.min-available-nodes": _Key(("strategy", "min_available_nodes"), int, _positive, "> 0"),
    "strategy.round-timeout": _Key(("strategy", "round_timeout"), float, _positive, "> 0 seconds"),
    "strategy.max-num-examples": _Key(("strategy", "max_num_examples"), int, _positive, "> 0"),
    "strategy.max-update-ratio": _Key(("strategy", "max_update_ratio"), float, _positive, "> 0"),
    "model.name": _Key(("model", "name"), str, bool, "a model id or folder"),
    "model.trust-remote-code": _Key(("model", "trust_remote_code"), bool),
    "model.quantization": _Key(
        ("model", "quantization"), int, lambda v: v in QUANTIZATION_BITS, f"one of {QUANTIZATION_BITS}"
    ),
    "model.quant-type": _Key(
        ("model", "quant_type"), str, lambda v: v in QUANT_TYPES, f"one of {QUANT_TYPES}"
    ),
    "model.compute-dtype": _Key(
        ("model", "compute_dtype"), str, lambda v: v in COMPUTE_DTYPES, f"one of {COMPUTE_DTYPES}"
    ),
    "model.revision": _Key(("model", "revision"), str),
    "model.gradient-checkpointing": _Key(("model", "gradient_checkpointing"), bool),
    "model.gradient-checkpointing-every": _Key(
        ("model", "gradient_checkpointing_every"), int, _positive, "> 0 (1 = every layer)"
    ),
    "model.lora.r": _Key(("model", "lora", "r"), int, _positive, "> 0"),
    "model.lora.alpha": _Key(("model", "lora", "alpha"), int, _positive, "> 0"),
    "model.lora.dropout": _Key(("model", "lora", "dropout"), float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.lora.target-modules": _Key(
        ("model", "lora", "target_modules"), str, None, "comma-separated module names", _csv_names
    ),
    "model.transport-dtype": _Key(
        ("model", "transport_dtype"), str, lambda v: v in TRANSPORT_DTYPES, f"one of {TRANSPORT_DTYPES}"
    ),
    "train.seq-length": _Key(("train", "seq_length"), int, _positive, "> 0"),
    "train.optim": _Key(("train", "optim"), str, bool, "a transformers optimizer name"),
    "train.learning-rate-max": _Key(("train", "learning_rate_max"), float, _positive, "> 0"),
    "train.learning-rate-min": _Key(("train", "learning_rate_min"), float, _non_negative, ">= 0"),
    "train.per-device-train-batch-size": _Key(
        ("train", "per_device_train_batch_size"), int, _positive, "> 0"
    ),
    "train.gradient-accumulation-steps": _Key(
        ("train", "gradient_accumulation_steps"), int, _positive, "> 0"
    ),
    "train.num-train-epochs": _Key(("train", "num_train_epochs"), int, _positive, "> 0"),
    "train.max-steps": _Key(("train", "max_steps"), int, _positive, "> 0"),
    "train.logging-steps": _Key(("train", "logging_steps"), int, _positive, "> 0"),
    "train.seed": _Key(("train", "seed"), int, _non_negative, ">= 0"),
    "train.save-every-round": _Key(
        ("train", "save_every_round"), int, _non_negative, ">= 0 (0 = final only)"
    ),
    "train.prompt-format": _Key(
        ("train", "prompt_format"), str, lambda v: v in PROMPT_FORMATS, f"one of {PROMPT_FORMATS}"
    ),
    "train.packing": _Key(("train", "packing"), bool),
    "train.padding-free": _Key(("train", "padding_free"), bool),
    "train.liger-kernel": _Key(("train", "liger_kernel"), bool),
    "train.compile-layers": _Key(("train", "compile_layers"), bool),
    "train.upcast-non-quantized": _Key(("train", "upcast_non_quantized"), bool),
    "output.dir": _Key(("output_dir",), str, bool, "a folder"),
    "comm.budget-limit-mb": _Key(("budget_limit_mb",), float, _positive, "> 0"),
    "comm.transport": _Key(
        ("comm", "transport"), str, lambda v: v in TRANSPORTS, f"one of {TRANSPORTS}"
    ),
    "comm.codec": _Key(("comm", "codec"), str, lambda v: v in CODECS, f"one of {CODECS}"),
    "comm.download-codec": _Key(
        ("comm", "download_codec"), str, lambda v: v in ("", *CODECS), f"'' (= comm.codec) or one of {CODECS}"
    ),
    "comm.block-size": _Key(
        ("comm", "block_size"), int, lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"
    ),
    "comm.ffa-lora": _Key(("comm", "ffa_lora"), bool),
    "resume.from": _Key(("resume_from",), str),
    "static.dataset.name": _Key(("dataset", "name"), str, bool, "a dataset id, file or folder"),
    "static.num-partitions": _Key(("dataset", "num_partitions"), int, _positive, "> 0"),
}


def _coerce(key: str, spec: _Key, value: Any) -> Any:
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise FedTuneError(f"run config {key}={value!r}: expected true or false")
        return value
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedTuneError(f"run config {key}={value!r}: expected an integer")
    elif spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FedTuneError(f"run config {key}={value!r}: expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise FedTuneError(f"run config {key}={value!r}: must be finite")
    elif spec.kind is str and not isinstance(value, str):
        raise FedTuneError(f"run config {key}={value!r}: expected a string")
    if spec.convert is not None:
        try:
            value = spec.convert(value)
        except ValueError as err:
            raise FedTuneError(f"run config {key}={value!r}: expected {spec.rule} ({err})") from None
    if spec.check is not None and not spec.check(value):
        raise FedTuneError(f"run config {key}={value!r}: must be {spec.rule}")
    return value


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def parse_run_config(run_config: Mapping[str, Any]) -> FedTuneConfig:
    """Validate a flat Flower run config and build the typed config (defaults for absent keys)."""
    unknown = sorted(set(run_config) - set(KEYS))
    if unknown:
        raise FedTuneError(f"unknown run config key {unknown[0]!r} (known: see pyproject.toml)")
    tree: dict[str, Any] = {}
    for key, value in run_config.items():
        _set(tree, KEYS[key].path, _coerce(key, KEYS[key], value))

    def section(cls: type, name: str, **nested: Any) -> Any:
        return cls(**{**tree.get(name, {}), **nested})

    model_tree = tree.get("model", {})
    lora = LoraSettings(**model_tree.pop("lora", {}))
    cfg = FedTuneConfig(
        **{k: v for k, v in tree.items() if k not in {"strategy", "model", "train", "dataset", "comm"}},
        strategy=section(StrategySettings, "strategy"),
        model=ModelSettings(**model_tree, lora=lora),
        train=section(TrainSettings, "train"),
        dataset=section(DatasetSettings, "dataset"),
        comm=section(CommSettings, "comm"),
    )
    _check_relations(cfg)
    return cfg


def _check_relations(cfg: FedTuneConfig) -> None:
    if cfg.comm.spec().active and cfg.model.transport_dtype != "float32":
        raise FedTuneError(
            "run config model.transport-dtype must stay float32 with comm.codec/comm.ffa-lora "
            '(comm.codec = "bf16" is the bf16 transport)'
        )
    if cfg.train.learning_rate_min > cfg.train.learning_rate_max:
        raise FedTuneError(
            "run config train.learning-rate-min must not exceed train.learning-rate-max "
            f"({cfg.train.learning_rate_min} > {cfg.train.learning_rate_max})"
        )
    if cfg.strategy.min_train_nodes > cfg.strategy.min_available_nodes:
        raise FedTuneError(
            "run config strategy.min-train-nodes must not exceed strategy.min-available-nodes "
            f"({cfg.strategy.min_train_nodes} > {cfg.strategy.min_available_nodes})"
        )
